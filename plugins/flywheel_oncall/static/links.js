// Links that leave the page's frame. Airflow shows these pages in an iframe sandboxed without
// allow-popups and allow-top-navigation, where a link to the whole window (target _top: an
// Airflow run) or to a new tab (target _blank: an MLflow run) does nothing. The frame is
// same-origin with the UI (allow-same-origin), so such a link is followed by a copy of it in the
// UI's own document, which is not sandboxed. Outside a frame, or framed by another origin, the
// browser follows the link as usual.
"use strict";
document.addEventListener("click", (event) => {
  const link = event.target.closest("a[target='_top'], a[target='_blank']");
  if (!link || event.defaultPrevented || event.button !== 0 || window.top === window) return;
  let top;
  try {
    top = window.top.document;
  } catch {
    return;
  }
  event.preventDefault();
  const copy = top.createElement("a");
  copy.href = link.href;
  copy.target = link.target;
  copy.rel = link.rel;
  copy.hidden = true;
  top.body.append(copy);
  copy.click();
  copy.remove();
});
