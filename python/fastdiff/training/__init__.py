"""Training: ``fastdiff train`` and ``fastdiff demo``, in layers that import downwards only.

A batch's route through a run, file by file:

1. ``config`` — :class:`TrainConfig`, the one definition of every setting (its fields' metadata make
   the ``fastdiff train`` flags, the TOML keys and the checks).
2. ``run`` — :func:`train` resolves the settings, builds the :class:`fastdiff.DataLoader` and the model
   side, and hands both to the loop; afterwards it plots the loss and saves the weights.
3. ``loop`` — the step loop: batches to the device, caption dropout, autocast, accumulation, clipping,
   the non-finite guard, EMA; when to log, validate, preview and checkpoint. ``monitor`` is its
   stability bookkeeping (the loss-spike detector, loss by noise level), ``validation`` the
   validation loss with per-sample fixed draws, ``trackers`` the TensorBoard event files.
4. ``tiny`` / ``sd`` / ``dit`` — the model side (a :class:`protocols.Task`): the from-scratch
   pixel-space model, a Stable Diffusion pipeline (VAE latents, text encoders, LoRA), or a
   flow-matching DiT pipeline (SD3, FLUX.1, Z-Image: one ``families`` preset each, loaded by
   ``dit_pipeline``); ``tiny`` and ``sd`` compute a batch's loss with ``objective`` (noising, target,
   min-SNR weights, MSE), ``dit`` with ``flow`` (rectified flow, timestep sampling and shift, weights).
5. ``checkpoint`` / ``outputs`` — the files: ``checkpoint-STEP/`` with every RNG state, ``loss.csv``,
   ``val_loss.csv``, ``spikes.jsonl``, ``loss.png``, ``loss_by_timestep.png``, preview and sample grids.
6. ``distributed`` — several ranks under torchrun: the process group, DDP over the task's trainable
   parameters, the loss averaged over ranks, what only rank 0 writes.

``protocols`` holds what the mechanics (``loop``, ``objective``, ``checkpoint``, ``outputs``) need of
the rest (loader, task, settings), so they never import ``config`` or ``run``. ``demo`` draws a
synthetic data set and runs :func:`train` on it.
"""
