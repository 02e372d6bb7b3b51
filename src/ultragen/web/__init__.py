"""``ultragen serve``: a Gradio page over the two-stage pipeline.

``settings`` turns what the page sends into a checked :class:`~ultragen.pipeline.job.GenerationJob` (the CLI's own
validation), ``runner`` runs one job at a time on the loaded pipeline with per-stage progress and a cancel between
steps, ``progress`` keeps the per-stage bars and their time left, ``page`` is the Gradio layout and its handlers,
``commands`` the ``serve`` subcommand. Gradio is imported only when the page is built.
"""
