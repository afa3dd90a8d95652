"""Does the detector need its important region? Deletion and insertion curves, and the randomisation check.

The pipeline of this step, one module each: :mod:`~gradlens.faithfulness.perturb` (which pixels, filled
with what), :mod:`~gradlens.faithfulness.compute` (the detector on every perturbed image, batched,
resumable, under torchrun), :mod:`~gradlens.faithfulness.curves` (curves, areas and paired statistics),
:mod:`~gradlens.faithfulness.randomise` (the model-parameter randomisation test) and
:mod:`~gradlens.faithfulness.run` (the command: plan, load, compute, store).
"""
