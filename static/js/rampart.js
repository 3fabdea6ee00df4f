/* Rampart web UI behaviour: confirmation dialogs, dynamic form rows, guardrail phrases.
 * Everything works without this file too: action links open a confirmation page and the
 * form rows have "Remove" checkboxes; this script only makes the same steps quicker.
 * Listeners are delegated to the document so content swapped in by htmx works as well. */
(function () {
  "use strict";

  // --- confirmation dialogs -----------------------------------------------------------
  document.addEventListener("click", function (event) {
    var opener = event.target.closest("[data-dialog]");
    if (opener) {
      var dialog = document.getElementById(opener.getAttribute("data-dialog"));
      if (dialog && typeof dialog.showModal === "function") {
        event.preventDefault();
        dialog.showModal();
        var first = dialog.querySelector("select, textarea, input:not([type=hidden])");
        if (first) first.focus();
      }
      return;
    }
    var closer = event.target.closest("[data-close]");
    if (closer) {
      var open = closer.closest("dialog");
      if (open) open.close();
    }
  });

  // --- dynamic rows (Django formsets) -------------------------------------------------
  function totalForms(prefix) {
    return document.getElementById("id_" + prefix + "-TOTAL_FORMS");
  }

  // Rows are groups named "Version 2", "Ramp step 3"... so that the repeated field labels
  // ("Key", "Weight") stay unambiguous for screen readers after rows come and go.
  function renumberRows() {
    document.querySelectorAll("[data-rows]").forEach(function (rows) {
      var number = 0;
      rows.querySelectorAll("[data-row]").forEach(function (row) {
        if (row.hidden || row.hasAttribute("data-deleted")) return;
        number += 1;
        row.setAttribute("aria-label", row.getAttribute("data-group-label") + " " + number);
        var label = row.querySelector("[data-step-number]");
        if (label) label.textContent = String(number);
      });
    });
  }

  document.addEventListener("click", function (event) {
    var add = event.target.closest("[data-add-row]");
    if (add) {
      var prefix = add.getAttribute("data-add-row");
      var template = document.getElementById(prefix + "-template");
      var rows = document.querySelector('[data-rows="' + prefix + '"]');
      var total = totalForms(prefix);
      if (!template || !rows || !total) return;
      var index = parseInt(total.value, 10);
      var html = template.innerHTML.replace(/__prefix__/g, String(index));
      rows.insertAdjacentHTML("beforeend", html);
      total.value = String(index + 1);
      var added = rows.lastElementChild;
      refreshMetricRow(added);
      renumberRows();
      var input = added.querySelector("input:not([type=hidden]):not([type=checkbox]):not([type=radio]), select");
      if (input) input.focus();
      return;
    }
    var remove = event.target.closest("[data-remove-row]");
    if (remove) {
      var row = remove.closest("[data-row]");
      var box = row.querySelector('input[type=checkbox][name$="-DELETE"]');
      if (box) box.checked = true;
      row.hidden = true;
      renumberRows();
      var section = row.closest("fieldset");
      var next = section && section.querySelector("[data-add-row]");
      if (next) next.focus();
    }
  });

  // --- canary-only sections -------------------------------------------------------------
  function applyKind() {
    var checked = document.querySelector('input[name="kind"]:checked');
    var kind = checked ? checked.value : null;
    document.querySelectorAll("[data-kind-only]").forEach(function (section) {
      section.hidden = kind !== null && section.getAttribute("data-kind-only") !== kind;
    });
  }

  // --- guardrail phrase: "p95 latency may rise at most 10%" -----------------------------
  var metricOptions = null;
  function options() {
    if (metricOptions === null) {
      var node = document.getElementById("metric-options");
      metricOptions = node ? JSON.parse(node.textContent) : {};
    }
    return metricOptions;
  }

  function refreshMetricRow(row) {
    if (!row || !row.hasAttribute("data-metric-row")) return;
    var metric = row.querySelector('select[name$="-metric"]');
    var role = row.querySelector('select[name$="-role"]');
    var margin = row.querySelector('input[name$="-margin_pct"]');
    var phrase = row.querySelector("[data-phrase]");
    var cell = row.querySelector("[data-margin-cell]");
    if (!metric || !role || !margin || !cell) return;
    var guardrail = role.value === "guardrail";
    cell.style.visibility = guardrail ? "visible" : "hidden";
    if (!guardrail && !margin.disabled) margin.value = "";
    if (!phrase) return;
    var info = options()[metric.value];
    if (!guardrail || !info) {
      phrase.textContent = "";
      return;
    }
    var verb = info.direction === "lower" ? "rise" : "fall";
    var value = parseFloat(margin.value);
    phrase.textContent = !value
      ? info.name + " may not " + verb + " at all"
      : info.name + " may " + verb + " at most " + value + "%";
  }

  document.addEventListener("input", function (event) {
    refreshMetricRow(event.target.closest("[data-metric-row]"));
  });
  document.addEventListener("change", function (event) {
    if (event.target.name === "kind") applyKind();
    refreshMetricRow(event.target.closest("[data-metric-row]"));
  });

  function init() {
    applyKind();
    renumberRows();
    document.querySelectorAll("[data-metric-row]").forEach(refreshMetricRow);
    var summary = document.getElementById("form-errors");
    if (summary) summary.focus();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
