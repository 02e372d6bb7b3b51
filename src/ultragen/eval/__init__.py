"""``ultragen eval``: the paper's evaluation protocol (FID, IS, CLIP score, CLIP-IQA and the patch versions of FID and
IS) on two folders of images, with local weights only, written as a report folder (metrics.json, report.html, crops).

Modules: ``config`` (settings and their checks), ``images`` (folder reading), ``prompts`` (which prompt each image
had), ``patches`` (crop boxes), ``weights`` (where the networks come from), ``inception`` and ``clip`` (the feature
networks), ``fidelity`` (FID, IS), ``clip_metrics`` (CLIP score, CLIP-IQA), ``run`` (the whole evaluation),
``report`` (the report folder), ``commands`` (the CLI)."""
