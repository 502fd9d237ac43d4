"""Training the conditional diffusion model: the published recipe, resumable, on one or many GPUs.

Modules, one job each (they use `model/` only through its public functions):

- ``samples``: the published training tuples of a 1 s sequence and gap weighting;
- ``datasets``: the published ``.npy`` layout and on-the-fly digital phantom studies as items;
- ``loader``: the resumable, DDP-sharded sampler and endless batch stream;
- ``config``: the validated TOML configuration (``configs/published.toml``, ``configs/phantom_small.toml``);
- ``state``: model, EMA, optimiser and scheduler; published init, EMA rule, checkpoints, export;
- ``steps``: one optimisation step, validation loss, preview sample;
- ``distributed``: process group under ``torchrun``;
- ``monitor``: progress bar and TensorBoard;
- ``trainer``: the loop (``train(config) -> TrainResult``), clean stop on Ctrl-C / SIGTERM.

Command line: ``ctp-node train --config training/configs/phantom_small.toml`` (``--resume``,
``--finetune``, ``--iterations``, ``--output``, ``--device``); several GPUs:
``torchrun --nproc_per_node N --no-python ctp-node train --config ...``.
"""
