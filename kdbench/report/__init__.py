"""Run records -> tidy runs table -> leaderboard (markdown, CSV, self-contained HTML) and plots.

Entry point: :func:`kdbench.report.leaderboard.write_leaderboard`. Imported lazily by the CLI; this
package ``__init__`` imports nothing heavy (matplotlib is loaded only by :mod:`kdbench.report.plots`).
"""
