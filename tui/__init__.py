"""fleet-tui: the Textual dashboard over the Pi fleet and the distill pipeline.

Entry point: ``tui.app:main`` (the ``fleet-tui`` console script).
"""
