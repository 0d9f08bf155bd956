// Only the fields that apply to a limit's window are shown: alert thresholds on budgets
// (hour, day, month), a guaranteed share on per-minute limits. Hidden, not disabled: what is
// stored is sent back as it is (a guarantee already typed stays visible, for its error).
(function () {
  "use strict";
  const APPLIES = {
    alert_at: (window) => ["hour", "day", "month"].includes(window),
    guaranteed: (window) => window === "minute",
  };

  function sync(windowSelect) {
    const prefix = windowSelect.name.slice(0, -"window".length);
    for (const [name, applies] of Object.entries(APPLIES)) {
      const input = document.querySelector(`[name="${prefix}${name}"]`);
      if (!input) continue;
      const hide = !applies(windowSelect.value) && !(name === "guaranteed" && input.value);
      const row = input.closest(".form-row");
      // a stacked form hides the field's row; a tabular inline (whose rows are table rows)
      // only the input: the column stays
      (row && row.tagName !== "TR" ? row : input).hidden = hide;
    }
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
