"""Flywheel's on-call pages in the Airflow UI: **Flywheel** in the navigation.

It opens the index of the deployment's projects (``/flywheel/projects``), each linking to its
own Drift and Models pages (``/flywheel/projects/<project>/drift``, ``.../models``).
Airflow 3 mounts ``fastapi_apps`` into its api-server under their ``url_prefix`` and shows
each ``external_views`` entry in the navigation, rendering its ``href`` in a same-origin
iframe at ``/plugin/<url_route>``. The iframe's requests carry the ``_token`` cookie the UI
sets at login, which the app checks with Airflow's own auth, per project (see
``flywheel_oncall.app``); nothing is served anonymously. What to do with what the pages show:
``docs/oncall.md``.
"""

from __future__ import annotations

from urllib.parse import quote

from airflow.plugins_manager import AirflowPlugin
from flywheel_oncall.app import INDEX_PATH, URL_PREFIX, create_app, ui_root


def _icon(path: str) -> str:
    """A 24 px line icon as a data URI: no request, so nothing to serve or authenticate."""
    svg = (
        '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 24 24" fill="none" stroke="#2b8fd6" '
        f'stroke-width="2" stroke-linecap="round" stroke-linejoin="round"><path d="{path}"/></svg>'
    )
    return "data:image/svg+xml," + quote(svg)


class FlywheelOncallPlugin(AirflowPlugin):
    name = "flywheel_oncall"
    fastapi_apps = [{"app": create_app(), "url_prefix": URL_PREFIX, "name": "Flywheel on-call"}]
    external_views = [
        {
            "name": "Flywheel",
            # Behind a proxy Airflow may be served under a path; the iframe's href is not
            # rewritten by the UI, so it must carry that path itself.
            "href": f"{ui_root()}{URL_PREFIX}{INDEX_PATH}",
            "url_route": "flywheel",
            "destination": "nav",
            "nav_top_level": True,
            "icon": _icon("M12 2l9 5v10l-9 5-9-5V7zM12 12l9-5M12 12v10M12 12L3 7"),
        },
    ]
