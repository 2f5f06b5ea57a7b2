// While a provisioning run goes on, the machine page fetches its timeline every few
// seconds and swaps it in (the page works without this: reload it).
(function () {
  "use strict";
  function refresh() {
    const box = document.getElementById("timeline");
    if (!box || !box.dataset.refresh) { return; }
    fetch(box.dataset.refresh, {credentials: "same-origin"})
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        const next = new DOMParser().parseFromString(html, "text/html").getElementById("timeline");
        if (next) { box.replaceWith(document.importNode(next, true)); }
        setTimeout(refresh, 3000);
      })
      .catch(function () { setTimeout(refresh, 10000); });
  }
  setTimeout(refresh, 3000);
})();
// A power request just queued from this page: follow it until it is done.
(function () {
  "use strict";
  const DONE = new Set(["succeeded", "failed", "cancelled"]);
  const note = document.getElementById("queued");
  if (!note || !note.dataset.powerRequest) { return; }
  function poll() {
    fetch(note.dataset.powerRequest, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (req) {
        const outcome = req.error || (req.result ? JSON.stringify(req.result) : "");
        note.textContent = "Request " + req.id + ": " + req.state + (outcome ? " (" + outcome + ")" : "");
        note.dataset.state = req.state;
        const row = document.querySelector('tr[data-request="' + req.id + '"]');
        if (row) {
          row.querySelector('[data-field="state"]').textContent = req.state;
          row.querySelector('[data-field="outcome"]').textContent = outcome;
        }
        if (!DONE.has(req.state)) { setTimeout(poll, 1000); }
      })
      .catch(function () { setTimeout(poll, 5000); });
  }
  poll();
})();
