// Alert thresholds apply to budgets (hour, day, month) only: their input is hidden while a
// limit's window is a minute (a refilling bucket) or none (concurrency).
(function () {
  "use strict";
  const BUDGETS = ["hour", "day", "month"];

  function sync(windowSelect) {
    const prefix = windowSelect.name.slice(0, -"window".length);
    const input = document.querySelector(`[name="${prefix}alert_at"]`);
    if (!input) return;
    const applies = BUDGETS.includes(windowSelect.value);
    const row = input.closest(".form-row") || input.closest("td");
    const target = row && row.tagName === "TD" ? input : row || input;
    target.hidden = !applies; // hidden, not disabled: the stored thresholds are sent back as they are
  }

  function syncAll() {
    document.querySelectorAll('select[name$="window"]').forEach(sync);
  }

  document.addEventListener("change", (event) => {
    if (event.target.matches && event.target.matches('select[name$="window"]')) sync(event.target);
  });
  document.addEventListener("formset:added", syncAll);
  document.addEventListener("DOMContentLoaded", syncAll);
})();
