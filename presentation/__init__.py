"""Presentation: what people read and see of a plan, apart from the data and the work that make it.

- :mod:`.report`: the plan's report page, one self-contained HTML file rendered from the Jinja2 template
  ``templates/report.html`` (autoescaped);
- :mod:`.pictures`: the simulated timeline as SVG (``templates/timeline.svg``) and PNG (headless chromium);
- :mod:`.tables`: plans as terminal tables (rich);
- :mod:`.progress`: the live progress line of long CLI work (every command's one progress display);
- :mod:`.cli_support`: what every command shares: its one output writer, the early output check, ``--set``
  and the options several commands spell alike;
- :mod:`.formatting`: durations, sizes, FLOPs, counts, layer and device lists as short text, for all of the
  above and for the CLI; :mod:`.colours`: the stage colours every picture shares;
- :mod:`.demo`: the README's main job (trace, plan, simulate, validate, summarise);
- :mod:`.trace_cli`, :mod:`.catalogue_cli`, :mod:`.report_cli`, :mod:`.demo_cli`: the ``distplan trace`` /
  ``models``, ``clusters`` / ``device-kinds``, ``report`` and ``demo`` commands (command modules, registered
  by ``distplan.cli``).

Only the CLI, its command modules and the service import this package. It imports distplan's core data
model; the demo and the command modules alone run pipeline stages (tracer, planner, lowering), inside the
functions that need them. ``tests/test_architecture.py`` and
``tests/presentation/test_presentation_package.py`` check these rules.
"""
