"""Presentation: what people read and see of a plan, apart from the data and the work that makes it.

The report page (:mod:`.report`, rendered from a Jinja2 template), the timeline pictures (SVG, PNG through
headless chromium), the demo's summary, the live progress line (:mod:`.progress`), and the ``distplan
report`` / ``distplan demo`` commands (:mod:`.report_cli`, :mod:`.demo_cli`).

Only the CLI and the service import this package; it imports distplan's core data model, never the service.
"""
