"""Image-quality metrics of the ScaleCrafter paper (FID, KID, patch FID/KID, spatial FID/KID).

* :mod:`ldm.evaluation.inception` -- the FID Inception-v3 (TF 2015-12-05 graph) and local weight loading
* :mod:`ldm.evaluation.metrics`   -- Fréchet distance and kernel (MMD²) distance of feature sets
* :mod:`ldm.evaluation.features`  -- folder streaming, clean resize, native-resolution crops, caching
* :mod:`ldm.evaluation.evaluate`  -- folder-vs-folder evaluation used by ``scripts/eval_fid.py``

See ``docs/evaluation.md`` for the protocol.
"""
from .evaluate import ALL_METRICS, compute_metrics, evaluate_folders, format_table, parse_metrics
from .features import (FeatureSettings, FolderFeatures, clean_resize, crop_boxes, extract_features,
                       folder_features, list_image_files, native_crops)
from .inception import (WEIGHTS_ENV, FIDInceptionV3, InceptionWeightsError, expected_state_dict_layout,
                        load_fid_inception, resolve_weights_path)
from .metrics import (EvalError, EvalWarning, KIDResult, feature_statistics, fid_from_features,
                      frechet_distance, kernel_inception_distance, mmd2_unbiased)

__all__ = [
    "ALL_METRICS", "compute_metrics", "evaluate_folders", "format_table", "parse_metrics",
    "FeatureSettings", "FolderFeatures", "clean_resize", "crop_boxes", "extract_features",
    "folder_features", "list_image_files", "native_crops",
    "WEIGHTS_ENV", "FIDInceptionV3", "InceptionWeightsError", "expected_state_dict_layout",
    "load_fid_inception", "resolve_weights_path",
    "EvalError", "EvalWarning", "KIDResult", "feature_statistics", "fid_from_features",
    "frechet_distance", "kernel_inception_distance", "mmd2_unbiased",
]
