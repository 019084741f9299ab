"""Paper tables from specs: rows (method + preset + model) x columns (metric + reference set).

``scripts/reproduce_table.py`` is the command line; this package is the library behind it, one module per
concern: :mod:`.spec` (schema, loading, checks, selection), :mod:`.plan` (sampling jobs, completion markers,
run records), :mod:`.store` (features and cells), :mod:`.render` (Markdown, CSV, published beside ours) and
:mod:`.estimate` (the dry run's time estimates). The names below are re-exported here
(``from ldm.evaluation import tables; tables.load_spec(...)``).


* :func:`load_spec` reads a YAML table spec (``configs/tables/*.yaml``) and checks it: every row of one table
  samples the same prompts with the same seed and sampler settings (a row that says otherwise is an error
  naming it), methods are ``scripts/txt2img.py --method`` values (:func:`check_spec`, given the list at run
  time), presets load, metrics and reference sets exist. Errors are :class:`SpecError` and name the row,
  column or key.
* :func:`plan` turns the selected rows into sampling jobs, one per distinct ``txt2img.py --sweep`` command:
  rows that sample the same thing share a job, and the base-resolution samples (the reference of FID_b-type
  columns) are one job per model and prompt set, shared by every row and column that needs them.
* :class:`FeatureStore` computes features once per folder and feature kind (in memory for the run, on disk
  in the evaluation feature cache of :mod:`ldm.evaluation.features` across runs): real-image and
  base-sample references are extracted once, whatever the number of rows.
* :func:`evaluate` computes every cell; :func:`render_markdown`, :func:`write_csv` and the JSON written by
  the script hold the table with N, settings, machine, time per image and peak memory per row.
* Published values: a spec's ``sources:`` say where the papers' numbers were read, a table's ``published:``
  names its source (or says the values were not found), and each row carries its published cells.
  :func:`published_comparison` / :func:`render_published` put every reproduced cell beside the published one
  (ours ÷ published) and compare the rank order of the rows per column (Kendall's τ_b, same best row).
* :func:`estimate` is the dry run's GPU-hour estimate, with the basis of each figure: measured runs in the
  output folder, else the paper's own time of a row of the job, else the spec's ``timing`` entries (a time with
  its basis and source, or a ratio to the direct-sampling estimate at the same size), else extrapolation by
  pixel count.
* Optional rows (``optional: true``: variants beside the paper's protocol) are planned only when asked for
  (:func:`select`).

Spec format: ``docs/evaluation.md`` ("Reproducing the paper tables") and the commented ``configs/tables/``.
"""
from .spec import (BASE, ENTRY_BASES, METRIC_ALIASES, METRICS, NOT_AVAILABLE, PRESET_FLAGS, REPO_ROOT,
                   RESERVED_FLAGS, SAFETY_FLAGS, Column, MetricDef, Model, Reference, Row, Spec, SpecError, Table,
                   _rel, _slug, check_options, check_spec, load_spec, resolve_metric, resolve_prompts, select)
from .plan import (COMPLETE_FILE, JOB_FILE, RUNS_FILE, Job, Plan, base_size, earlier_versions, expected_files,
                   identity, images_present, job_complete, job_stats, machine_description, materialize_prompts,
                   now_utc, plan, read_runs, render_dataset_references, write_text_atomic)
from .store import (EXTRACTORS, PATCH_SPATIAL, FeatureStore, InceptionExtractor, ShapeExtractor, TableFeatureSettings,
                    compute_cell, evaluate)
from .render import (format_cell, kendall_tau_b, published_comparison, rank_order, render_markdown, render_published,
                     replace_block, table_rows, write_csv)
from .estimate import BASIS_LABELS, estimate, published_time

__all__ = ["SpecError", "MetricDef", "METRICS", "METRIC_ALIASES", "resolve_metric", "Spec", "Table", "Row", "Column",
           "Model", "Reference", "Job", "Plan", "load_spec", "check_spec", "select", "plan", "base_size",
           "materialize_prompts", "render_dataset_references", "job_complete", "images_present", "expected_files",
           "job_stats", "read_runs", "FeatureStore", "ShapeExtractor", "InceptionExtractor", "EXTRACTORS",
           "compute_cell", "evaluate", "table_rows", "write_csv", "render_markdown", "replace_block", "estimate",
           "published_comparison", "render_published", "kendall_tau_b", "rank_order", "published_time",
           "machine_description", "now_utc", "write_text_atomic", "COMPLETE_FILE", "RUNS_FILE", "BASE",
           "BASIS_LABELS", "PATCH_SPATIAL", "JOB_FILE", "earlier_versions", "identity", "NOT_AVAILABLE",
           "PRESET_FLAGS", "RESERVED_FLAGS", "REPO_ROOT", "TableFeatureSettings", "format_cell", "resolve_prompts",
           "ENTRY_BASES", "SAFETY_FLAGS", "check_options",
           "_rel", "_slug"]  # paths and folder names as the runner writes them
