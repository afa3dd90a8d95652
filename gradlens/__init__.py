"""gradlens: gradient-attribution analysis of object detectors.

The Python API mirrors the pipeline; the ``gradlens`` command is a thin layer over it.

>>> import gradlens
>>> gt = gradlens.load_ground_truth(gradlens.resolve_coco_paths("data/coco"))   # doctest: +SKIP
>>> dets = gradlens.read_detections("results.json", gt)                       # doctest: +SKIP
>>> objects, images = gradlens.quality_scores(dets, gt)                       # doctest: +SKIP
>>> detector = gradlens.load_detector("retinanet_cednet.pth")                  # doctest: +SKIP
>>> detections = detector.detect([gradlens.to_tensor(gradlens.read_image("x.jpg"))])  # doctest: +SKIP
>>> grads = gradlens.input_gradients(detector, [image], [gradlens.image_targets(gt, 42, detector.categories)])  # doctest: +SKIP
>>> curve = gradlens.area_curve(maps, gradlens.threshold_grid(1e-2, 200, "log"))  # doctest: +SKIP
>>> share = gradlens.box_energy(a_map, [(10, 20, 110, 140)])                 # doctest: +SKIP
"""

from gradlens import device as _device  # noqa: F401  (sets CUDA determinism settings before CUDA starts)
from gradlens._version import __version__
from gradlens.attribution.methods import METHODS, AttributionConfig, gradient_maps, input_gradients, reduce_channels
from gradlens.attribution.store import MapStore
from gradlens.attribution.targets import image_targets
from gradlens.attribution.workdir import selection_ids, selection_table, workdir_maps
from gradlens.data.coco import CocoPaths, GroundTruth, load_ground_truth, resolve_coco_paths
from gradlens.data.detections import Detections, read_detections, write_detections
from gradlens.data.images import read_image, to_tensor
from gradlens.data.synthetic import make_synthetic_coco, simulate_detections
from gradlens.errors import CheckpointError, GradlensError
from gradlens.evaluation import coco_map
from gradlens.faithfulness.compute import FaithfulnessConfig, faithfulness_rows
from gradlens.faithfulness.randomise import map_similarity, randomisation_steps, randomise
from gradlens.faithfulness.run import run_faithfulness
from gradlens.inference import InferenceSettings, cached_detections, detect_images
from gradlens.models.bundled import BUNDLED, bundled_detector_path
from gradlens.models.detectors.adapter import LossDictDetector, NoObjectSplitError, torchvision_coco_categories
from gradlens.models.detectors.deformable_detr import MMDetDeformableDETR
from gradlens.models.detectors.mask2former import MASK2FORMER_ARCHITECTURES, MMDetMask2Former, build_mask2former
from gradlens.models.detectors.mmdet_rcnn import MMDetTwoStage
from gradlens.models.detectors.rcnn import ExpectedLossRCNN
from gradlens.models.formats.checkpoints import load_detector, save_detector
from gradlens.models.interface import Detector, total_loss
from gradlens.models.registry import (ARCHITECTURES, DETR_ARCHITECTURES, TWO_STAGE_ARCHITECTURES, build_deformable_detr,
                                      build_detector, build_two_stage)
from gradlens.models.detectors.retinanet import RetinaNetDetector
from gradlens.regions.area import area_curve, area_curve_from_store, threshold_grid
from gradlens.regions.concentration import effective_area, gini, mass_area, mass_area_auc
from gradlens.regions.decomposition import image_terms, log_area_under_curve, verdict
from gradlens.regions.localisation import box_energy, box_fraction, box_mask, inside_outside_areas, pointing_game
from gradlens.regions.per_image import image_curves
from gradlens.regions.run import run_area_curve
from gradlens.regions.statistics import area_under_curve, bootstrap_mean, paired_difference, wilcoxon_p
from gradlens.runner import DetectorRun
from gradlens.scoring.quality import QualityScores, quality_scores
from gradlens.scoring.store import read_scores
from gradlens.selection.improvement import select_images
from gradlens.selection.manifest import load_manifest
from gradlens.selection.run import run_selection

__all__ = [
    "METHODS",
    "AttributionConfig",
    "DetectorRun",
    "MapStore",
    "area_curve",
    "area_curve_from_store",
    "area_under_curve",
    "effective_area",
    "gini",
    "mass_area",
    "mass_area_auc",
    "image_terms",
    "log_area_under_curve",
    "verdict",
    "Detector",
    "LossDictDetector",
    "ExpectedLossRCNN",
    "MMDetDeformableDETR",
    "MMDetMask2Former",
    "MMDetTwoStage",
    "TWO_STAGE_ARCHITECTURES",
    "DETR_ARCHITECTURES",
    "MASK2FORMER_ARCHITECTURES",
    "NoObjectSplitError",
    "torchvision_coco_categories",
    "total_loss",
    "FaithfulnessConfig",
    "faithfulness_rows",
    "map_similarity",
    "randomisation_steps",
    "randomise",
    "run_faithfulness",
    "bootstrap_mean",
    "box_energy",
    "box_fraction",
    "box_mask",
    "image_curves",
    "inside_outside_areas",
    "paired_difference",
    "pointing_game",
    "wilcoxon_p",
    "draw_figure_a1",
    "gradient_maps",
    "image_targets",
    "input_gradients",
    "plot_area_curve",
    "reduce_channels",
    "render_figures_a1",
    "run_area_curve",
    "selection_ids",
    "selection_table",
    "threshold_grid",
    "workdir_maps",
    "ARCHITECTURES",
    "BUNDLED",
    "CheckpointError",
    "InferenceSettings",
    "RetinaNetDetector",
    "build_detector",
    "build_two_stage",
    "build_deformable_detr",
    "build_mask2former",
    "bundled_detector_path",
    "cached_detections",
    "coco_map",
    "detect_images",
    "load_detector",
    "save_detector",
    "to_tensor",
    "CocoPaths",
    "Detections",
    "GradlensError",
    "GroundTruth",
    "QualityScores",
    "__version__",
    "load_ground_truth",
    "load_manifest",
    "make_synthetic_coco",
    "quality_scores",
    "read_detections",
    "read_image",
    "read_scores",
    "resolve_coco_paths",
    "run_selection",
    "select_images",
    "simulate_detections",
    "write_detections",
]


def __getattr__(name):  # the figure functions import matplotlib: only when asked for
    if name in ("draw_figure_a1", "render_figures_a1"):
        from gradlens.figures import figure_a1

        return getattr(figure_a1, name)
    if name == "plot_area_curve":
        from gradlens.figures.area_curve import plot_area_curve

        return plot_area_curve
    raise AttributeError(f"module 'gradlens' has no attribute {name!r}")
