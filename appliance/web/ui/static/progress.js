// Live progress: each row polls its machine's lifecycle (GET, the login session's
// cookie) and updates in place; rows stop polling once ready or failed.
(function () {
  "use strict";
  const DONE = new Set(["ready", "failed"]);
  function update(row) {
    fetch(row.dataset.lifecycle, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (body) {
        const state = row.querySelector('[data-field="state"]');
        state.textContent = body.state;
        state.className = "state state-" + body.state;
        row.querySelector('[data-field="phase"]').textContent = body.phase || "";
        row.querySelector('[data-field="reason"]').textContent = body.reason || "";
        if (!DONE.has(body.state)) { setTimeout(function () { update(row); }, 2000); }
      })
      .catch(function () { setTimeout(function () { update(row); }, 5000); });
  }
  document.querySelectorAll("tr[data-lifecycle]").forEach(update);
})();
