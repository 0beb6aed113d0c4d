"""Evaluation of edited models: the metrics of DESIGN.md section 5, under the record keys of section 7.

- `safeedit.eval.classification`: UA, RA, TA, MIA-efficacy (SVC attack), `mia_auc`, gap to retrain.
"""
