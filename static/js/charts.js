/* Charts of the experiment page (Chart.js): relative lift with its always-valid interval per
 * metric and arm, and latency percentiles per arm, one point per analysis run. The data
 * comes from the JSON endpoint named by [data-chart-source]; while the experiment is live
 * (data-live="true") it is fetched again every 5 seconds and the charts are updated. */
(function () {
  "use strict";

  var REFRESH_MS = 5000;
  // The same order as the .arm-N classes of rampart.css, so colours match the split bars.
  var ARM_COLOURS = ["#8a94a6", "#2f55d4", "#d9480f", "#2b8a3e", "#9c36b5", "#0c8599"];
  var HARM = "#b42318";
  var QUANTILE_DASH = { p50: [6, 4], p95: [], p99: [2, 3] };

  function css(name) {
    return getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  }

  function timeLabel(iso) {
    var date = new Date(iso);
    return date.toISOString().slice(11, 19);
  }

  function percent(values) {
    return values.map(function (v) { return v === null || v === undefined ? null : v * 100; });
  }

  function alpha(hex, a) {
    var n = parseInt(hex.slice(1), 16);
    return "rgba(" + ((n >> 16) & 255) + "," + ((n >> 8) & 255) + "," + (n & 255) + "," + a + ")";
  }

  function baseOptions(yTitle, yFormat) {
    var text = css("--muted") || "#5a6472";
    var grid = css("--border") || "#dde1e7";
    return {
      responsive: true,
      maintainAspectRatio: false,
      animation: false,
      interaction: { mode: "index", intersect: false },
      plugins: {
        legend: { labels: { color: text, boxWidth: 14, usePointStyle: false,
          filter: function (item) { return !item.text.startsWith("_"); } } },
        tooltip: {
          filter: function (item) { return !item.dataset.label.startsWith("_"); },
          callbacks: {
            label: function (ctx) {
              var v = ctx.parsed.y;
              return ctx.dataset.label + ": " + (v === null ? "—" : yFormat(v));
            }
          }
        }
      },
      scales: {
        x: { ticks: { color: text, maxTicksLimit: 6, maxRotation: 0 }, grid: { color: grid } },
        y: { title: { display: true, text: yTitle, color: text },
          ticks: { color: text, callback: function (v) { return yFormat(v); } },
          grid: { color: grid } }
      },
      elements: { point: { radius: 0, hitRadius: 6 }, line: { tension: 0.15, borderWidth: 2 } }
    };
  }

  function latencyDatasets(data) {
    var sets = [];
    data.arms.forEach(function (arm, index) {
      var colour = ARM_COLOURS[index % ARM_COLOURS.length];
      ["p50", "p95", "p99"].forEach(function (q) {
        sets.push({
          label: arm + " " + q,
          data: (data.latency[arm] || {})[q] || [],
          borderColor: colour,
          backgroundColor: colour,
          borderDash: QUANTILE_DASH[q],
          spanGaps: true
        });
      });
    });
    return sets;
  }

  // Generative answers (data.llm[arm][field]): TTFT percentiles, tokens per second, cost.
  function llmDatasets(data, fields) {
    var sets = [];
    data.arms.forEach(function (arm, index) {
      var colour = ARM_COLOURS[index % ARM_COLOURS.length];
      fields.forEach(function (field) {
        var q = field.slice(-3);
        sets.push({
          label: arm + (fields.length > 1 ? " " + q : ""),
          data: ((data.llm || {})[arm] || {})[field] || [],
          borderColor: colour,
          backgroundColor: colour,
          borderDash: QUANTILE_DASH[q] || [],
          spanGaps: true
        });
      });
    });
    return sets;
  }

  function hasValues(sets) {
    return sets.some(function (set) {
      return set.data.some(function (v) { return v !== null && v !== undefined; });
    });
  }

  function liftDatasets(series, colour) {
    var n = series.lift.length;
    var sets = [
      { label: "_lower", data: percent(series.lower), borderColor: alpha(colour, 0.35),
        borderWidth: 1, pointRadius: 0, fill: false },
      { label: "95% always-valid interval", data: percent(series.upper),
        borderColor: alpha(colour, 0.35), borderWidth: 1, pointRadius: 0,
        backgroundColor: alpha(colour, 0.18), fill: "-1" },
      { label: "Lift", data: percent(series.lift), borderColor: colour, backgroundColor: colour },
      { label: "_zero", data: new Array(n).fill(0), borderColor: css("--muted") || "#5a6472",
        borderWidth: 1, borderDash: [3, 3], pointRadius: 0 }
    ];
    if (series.margin !== null && series.margin !== undefined) {
      sets.push({ label: "Tolerated harm", data: new Array(n).fill(series.margin * 100),
        borderColor: HARM, borderWidth: 1.5, borderDash: [6, 4], pointRadius: 0 });
    }
    return sets;
  }

  function signedPercent(v) {
    return (v > 0 ? "+" : "") + (Math.abs(v) < 10 ? v.toFixed(1) : v.toFixed(0)) + "%";
  }

  function ms(v) {
    return (v >= 100 ? v.toFixed(0) : v.toFixed(1)) + " ms";
  }

  function perSecond(v) {
    return v.toFixed(0) + "/s";
  }

  function dollars(v) {
    return "$" + (v < 0.01 ? v.toPrecision(2) : v.toFixed(4));
  }

  var LLM_CHARTS = [
    { id: "ttft", fields: ["ttft_p50", "ttft_p95", "ttft_p99"], title: "time to first token",
      format: ms },
    { id: "tps", fields: ["tokens_per_s_mean"], title: "output tokens per second",
      format: perSecond },
    { id: "cost", fields: ["cost_mean"], title: "cost per request", format: dollars }
  ];

  function Charts(root) {
    this.root = root;
    this.url = root.getAttribute("data-chart-source");
    this.live = root.getAttribute("data-live") === "true";
    this.latency = null;
    this.llm = {};
    this.lift = {};
    this.liftBox = root.querySelector("#lift-charts");
    this.empty = root.querySelector("[data-chart-empty]");
  }

  Charts.prototype.load = function () {
    var self = this;
    return fetch(this.url, { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { return r.ok ? r.json() : Promise.reject(r.status); })
      .then(function (data) { self.draw(data); })
      .catch(function () { /* keep the last drawing; the next poll retries */ });
  };

  Charts.prototype.draw = function (data) {
    var labels = data.times.map(timeLabel);
    if (this.empty) this.empty.hidden = labels.length > 0;
    var canvas = this.root.querySelector("#latency-chart");
    if (canvas) {
      if (this.latency === null) {
        this.latency = new window.Chart(canvas, {
          type: "line",
          data: { labels: labels, datasets: latencyDatasets(data) },
          options: baseOptions("latency", ms)
        });
      } else {
        this.latency.data.labels = labels;
        this.latency.data.datasets = latencyDatasets(data);
        this.latency.update("none");
      }
    }
    var self = this;
    LLM_CHARTS.forEach(function (spec) {
      var box = self.root.querySelector("#" + spec.id + "-chart");
      var sets = llmDatasets(data, spec.fields);
      if (!box || !hasValues(sets)) return;
      self.root.querySelector("#" + spec.id + "-chart-card").hidden = false;
      var chart = self.llm[spec.id];
      if (!chart) {
        self.llm[spec.id] = new window.Chart(box, {
          type: "line",
          data: { labels: labels, datasets: sets },
          options: baseOptions(spec.title, spec.format)
        });
      } else {
        chart.data.labels = labels;
        chart.data.datasets = sets;
        chart.update("none");
      }
    });
    data.lift.forEach(function (series) {
      var id = series.metric + ":" + series.arm;
      var colour = ARM_COLOURS[Math.max(1, data.arms.indexOf(series.arm)) % ARM_COLOURS.length];
      var chart = self.lift[id];
      if (!chart) {
        var card = document.createElement("div");
        card.className = "chart-card";
        var title = document.createElement("h3");
        title.textContent = series.name + ": " + series.arm + " vs " + series.control_arm;
        var hint = document.createElement("p");
        hint.className = "hint";
        hint.textContent = "Relative lift (" + (series.direction === "lower" ? "lower" : "higher") +
          " is better)" + (series.margin !== null ? "; dashed red: the tolerated harm" : "");
        var box = document.createElement("div");
        box.className = "chart-box";
        var c = document.createElement("canvas");
        c.setAttribute("role", "img");
        c.setAttribute("aria-label", "Lift of " + series.name + " on " + series.arm + " over time");
        c.setAttribute("data-lift-chart", id);
        box.appendChild(c);
        card.appendChild(title);
        card.appendChild(hint);
        card.appendChild(box);
        self.liftBox.appendChild(card);
        self.lift[id] = new window.Chart(c, {
          type: "line",
          data: { labels: labels, datasets: liftDatasets(series, colour) },
          options: baseOptions("lift vs control", signedPercent)
        });
      } else {
        chart.data.labels = labels;
        chart.data.datasets = liftDatasets(series, colour);
        chart.update("none");
      }
    });
    this.root.setAttribute("data-chart-points", String(labels.length));
  };

  Charts.prototype.start = function () {
    var self = this;
    this.load();
    if (this.live) {
      window.setInterval(function () {
        if (!document.hidden) self.load();
      }, REFRESH_MS);
    }
  };

  function init() {
    var root = document.querySelector("[data-chart-source]");
    if (root && window.Chart) new Charts(root).start();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
