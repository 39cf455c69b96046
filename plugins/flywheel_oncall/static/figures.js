// Draws the plotly figures a page embeds: each <script type="application/json" class="plotly-figure"
// data-target="<element id>"> holds a figure's JSON (flywheel_oncall/timeline.py), drawn into that element.
(function () {
  "use strict";
  function draw() {
    document.querySelectorAll("script.plotly-figure").forEach(function (source) {
      var target = document.getElementById(source.dataset.target);
      var figure = JSON.parse(source.textContent);
      window.Plotly.newPlot(target, figure.data, figure.layout, { staticPlot: false, displaylogo: false, responsive: true });
    });
  }
  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", draw);
  } else {
    draw();
  }
})();
