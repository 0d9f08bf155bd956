// Draws the usage charts of a feature page from the JSON that the page embeds
// (<script type="application/json" id="usage-chart-data">), with Chart.js served by the
// project itself.
(function () {
  "use strict";

  function draw(canvas, series, title) {
    return new Chart(canvas, {
      type: "bar",
      data: {
        labels: series.labels,
        datasets: [
          { label: "input tokens", data: series.input_tokens, stack: "tokens",
            backgroundColor: "#79aec8", yAxisID: "tokens" },
          { label: "output tokens", data: series.output_tokens, stack: "tokens",
            backgroundColor: "#417690", yAxisID: "tokens" },
          { label: "refusals", data: series.refused, type: "line", borderColor: "#ba2121",
            backgroundColor: "#ba2121", yAxisID: "events", tension: 0.2 },
          { label: "truncations", data: series.truncated, type: "line", borderColor: "#e0a100",
            backgroundColor: "#e0a100", yAxisID: "events", tension: 0.2 },
          { label: "upstream 429s", data: series.upstream_429, type: "line",
            borderColor: "#6b4c9a", backgroundColor: "#6b4c9a", yAxisID: "events",
            tension: 0.2 }
        ]
      },
      options: {
        responsive: true,
        maintainAspectRatio: false,
        animation: false,
        plugins: { title: { display: true, text: title } },
        scales: {
          tokens: { type: "linear", position: "left", stacked: true, beginAtZero: true,
                    title: { display: true, text: "tokens" } },
          events: { type: "linear", position: "right", beginAtZero: true,
                    grid: { drawOnChartArea: false }, title: { display: true, text: "events" } },
          x: { stacked: true }
        }
      }
    });
  }

  function start() {
    var source = document.getElementById("usage-chart-data");
    if (!source || typeof Chart === "undefined") { return; }
    var data = JSON.parse(source.textContent);
    window.usageCharts = {
      hourly: draw(document.getElementById("usage-chart-hourly"), data.hourly,
                   "Last 24 hours (UTC, per hour)"),
      daily: draw(document.getElementById("usage-chart-daily"), data.daily,
                  "Last 30 days (UTC, per day)")
    };
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
