"""The report's HTML: one Jinja template, autoescaped (every value from a run, model text above all, is shown as
text), no script, and a Content-Security-Policy that lets the page load nothing but its own inline styles and
data: images: it opens the same on an air-gapped server, from a mail, or from a file."""
from __future__ import annotations

import jinja2

TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>sdg report: {{ name }}</title>
<style>
 body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0;
        color: #1d2330; background: #f6f7f9; font-size: 14px; }
 header { background: #1d2330; color: #fff; padding: 14px 28px; }
 header h1 { margin: 0; font-size: 20px; font-weight: 600; }
 header .sub { color: #b8c0d0; margin-top: 4px; font-size: 13px; }
 nav { padding: 6px 28px; background: #e9ecf2; font-size: 13px; }
 nav a { margin-right: 14px; color: #28457a; text-decoration: none; }
 main { padding: 8px 28px 40px; max-width: 1280px; }
 section { background: #fff; border: 1px solid #dde1e8; border-radius: 6px; padding: 6px 18px 14px; margin: 16px 0; }
 h2 { font-size: 16px; margin: 10px 0 8px; }
 h3 { font-size: 14px; margin: 12px 0 6px; }
 .cards { display: flex; flex-wrap: wrap; gap: 10px; margin: 8px 0; }
 .card { background: #f6f7f9; border-radius: 5px; padding: 8px 14px; min-width: 120px; }
 .card .v { font-size: 18px; font-weight: 600; }
 .card .k { font-size: 12px; color: #5b6475; }
 .status-progress { color: #9a5b00; font-weight: 600; }
 .status-done { color: #2d7a3e; font-weight: 600; }
 table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
 caption { text-align: left; font-weight: 600; padding: 4px 0; }
 th, td { border-bottom: 1px solid #e3e6ec; padding: 3px 10px 3px 0; text-align: left; vertical-align: top; }
 td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
 .plots { display: flex; flex-wrap: wrap; gap: 14px; align-items: flex-start; }
 figure.plot { margin: 6px 0; }
 figure.plot img { display: block; max-width: 100%; height: auto; }
 figcaption { font-size: 12px; color: #5b6475; margin-top: 2px; }
 .note { color: #5b6475; font-size: 13px; }
 pre.row { background: #f6f7f9; border: 1px solid #e3e6ec; border-radius: 4px; padding: 6px 8px; margin: 4px 0 10px;
           white-space: pre-wrap; word-break: break-word; font-size: 12px; max-height: 360px; overflow: auto; }
 .reason { color: #a3222b; font-weight: 600; font-size: 13px; }
 details { margin: 4px 0; }
 summary { cursor: pointer; font-weight: 600; }
</style>
</head>
<body>
<header>
 <h1>{{ name }} <span class="sub">· {{ method }}</span></h1>
 <div class="sub">{{ out }} · generated {{ generated_at }} by sdg report</div>
</header>
<nav>
 <a href="#overview">Overview</a><a href="#funnel">Funnel</a><a href="#throughput">Throughput</a>
 <a href="#lengths">Output lengths</a>{% if method_section %}<a href="#method">{{ method_section.title.split(':')[0] }}</a>{% endif %}
 <a href="#quality">Diversity and decontamination</a><a href="#samples">Samples</a>
</nav>
<main>
<section id="overview">
 <h2>Overview</h2>
 <div class="cards">
  {% for k, v in cards %}<div class="card"><div class="v">{{ v }}</div><div class="k">{{ k }}</div></div>{% endfor %}
 </div>
 <p>Status: {% if in_progress %}<span class="status-progress">in progress or not published</span>: figures are
 those of the shards committed when this report was made{% if published %}; the published figures (diversity,
 dedup) are from the last publish{% endif %}.{% else %}<span class="status-done">published</span>.{% endif %}
 Model: {{ model }}.</p>
 {{ table(stage_table) }}
 <p class="note">A stage's seconds run from its first request (once its engine has started) to its last result in
 each launch; stages that stream overlap, so the "output tok/s" card divides the output tokens by the time the
 engines spent in their generate loops.</p>
</section>

<section id="funnel">
 <h2>Acceptance funnel</h2>
 {{ plots([funnel]) }}
 {{ table(reason_table) }}
 {{ table(publish_table) }}
</section>

<section id="throughput">
 <h2>Throughput over time</h2>
 {{ plots([throughput]) }}
 {% if not throughput %}<p class="note">{{ throughput_note }}</p>{% endif %}
 {{ table(writer_table) }}
</section>

<section id="lengths">
 <h2>Output lengths and truncation</h2>
 {{ plots(length_plots) }}
 {% if not length_plots and not length_note %}<p class="note">No model stage has committed an output yet.</p>{% endif %}
 {% if length_note %}<p class="note">{{ length_note }}</p>{% endif %}
 {{ table(truncation_table) }}
</section>

{% if method_section %}
<section id="method">
 <h2>{{ method_section.title }}</h2>
 {{ plots(method_section.plots) }}
 {% for t in method_section.tables %}{{ table(t) }}{% endfor %}
 {% for n in method_section.notes %}<p class="note">{{ n }}</p>{% endfor %}
</section>
{% endif %}

<section id="quality">
 <h2>Diversity and decontamination</h2>
 {% if diversity_table %}{{ table(diversity_table) }}{% else %}<p class="note">Not published yet: diversity
 figures are computed when the run is published.</p>{% endif %}
 {{ plots([decontam_plot]) }}
 {{ table(decontam_table) }}
 {% for n in quality_notes %}<p class="note">{{ n }}</p>{% endfor %}
</section>

<section id="samples">
 <h2>Sample rows</h2>
 <p class="note">A seeded sample per stage; every reject reason first gets an example. Model text is shown as
 text.</p>
 {% for st in samples %}
 <details class="stage-samples" open>
  <summary>{{ st.name }}: {{ st.rows|length }} accepted, {{ st.rejects|length }} rejected shown</summary>
  {% for r in st.rows %}<pre class="row sample-accepted">{{ r }}</pre>{% endfor %}
  {% for r in st.rejects %}<div class="reason">rejected: {{ r.reason }}</div><pre class="row sample-rejected">{{ r.row }}</pre>{% endfor %}
 </details>
 {% endfor %}
</section>
</main>
</body>
</html>
"""

MACROS = r"""
{% macro table(t) -%}
{% if t %}{% set caption, headers, rows = t %}
<table>{% if caption %}<caption>{{ caption }}</caption>{% endif %}
<thead><tr>{% for h in headers %}<th{% if loop.index > 1 %} class="n"{% endif %}>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in rows %}<tr>{% for c in row %}<td{% if loop.index > 1 %} class="n"{% endif %}>{{ c }}</td>{% endfor %}</tr>{% endfor %}</tbody>
</table>{% endif %}
{%- endmacro %}
{% macro plots(items) -%}
{% set shown = items | select | list %}{% if shown %}<div class="plots">{% for p in shown %}
<figure class="plot" id="plot-{{ p.name }}" data-plot="{{ p.name }}" data-points="{{ p.points }}">
<img src="{{ p.uri }}" alt="{{ p.title }}"><figcaption>{{ p.title }}{% if p.note %} · {{ p.note }}{% endif %}</figcaption>
</figure>{% endfor %}</div>{% endif %}
{%- endmacro %}
"""


def render(**context) -> str:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    macros = env.from_string(MACROS).module
    return env.from_string(TEMPLATE).render(table=macros.table, plots=macros.plots, **context)
