// The on-call actions: each form.action posts its fields as JSON (a cross-site form cannot, which
// keeps the session cookie from being used elsewhere) and shows Airflow's answer beside it.
"use strict";
document.addEventListener("submit", async (event) => {
  const form = event.target.closest("form.action");
  if (!form) return;
  event.preventDefault();
  const result = form.querySelector(".result");
  const body = {};
  for (const [name, value] of new FormData(form)) body[name] = name === "version" ? Number(value) : value;
  const buttons = form.querySelectorAll("button");
  buttons.forEach((b) => (b.disabled = true));
  result.className = "result";
  result.textContent = "sending…";
  try {
    const response = await fetch(form.action, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => ({ detail: response.statusText }));
    if (!response.ok) throw new Error(`${response.status}: ${typeof answer.detail === "string" ? answer.detail : JSON.stringify(answer.detail)}`);
    result.className = "result badge good";
    result.textContent = answer.outcome || "done";
    if (answer.url) {
      const link = document.createElement("a");
      link.href = answer.url; link.target = "_top"; link.textContent = " open the run";
      result.after(link);
    }
  } catch (error) {
    result.className = "result badge bad";
    result.textContent = String(error.message || error);
    buttons.forEach((b) => (b.disabled = false));
  }
});
document.addEventListener("click", (event) => {
  const opener = event.target.closest(".open-dialog");
  if (opener && !opener.disabled) document.getElementById(opener.dataset.dialog).showModal();
  const closer = event.target.closest(".close-dialog");
  if (closer) closer.closest("dialog").close();
});
