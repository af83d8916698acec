"""``ebft evaluate``: held-out evaluation of a base model or a checkpoint (docs/design.md §8).

Every model is scored by the frozen feature network of the *base* model, so every checkpoint is
measured in the same feature space, on rollouts seeded by the held-out row's place (two models get
identically seeded samples).

**Strided configs** (spec 9.1, 9.3): on every held-out document, strided rollouts exactly as in
training (n samples per block at the training temperature, the same anchors). Reported:

* alignment, diversity and reward with the training settings (whitening included), averaged over all
  (block, sample) pairs; alignment and reward also best-of-n (per block the best of the n samples);
* the conditional feature-matching loss, estimated without bias from the n samples on unit-norm,
  unwhitened features (``metrics.cfm_unbiased``);
* teacher-forced cross-entropy and perplexity over all tokens and over answer tokens only.

**Structured configs**: on every held-out prompt row, ``trl.num_generations`` full completions with
transformers generate and the trl sampling settings (multi-turn rows rolled out turn by turn). The
same keys, with a prompt in the place of a block: alignment, diversity and reward per completion,
best-of-n and CFM per prompt; CE over prompt + ground truth and over the ground-truth tokens the policy
would write. Also the mean completion length and the fraction of completions cut at their cap. With
``execute``, each completion's code is run against the row's unit tests in the sandbox: pass@1 and
pass@n over the rows that have tests, and the ground truth's own pass rate as a check of the tests.

Rows come from the config's validation split (``val_set_size``), or from its datasets read at
``--split``. Per-row values are kept so that two models can be compared row by row.

Modules: ``run`` (:func:`~ebft.evaluate.run.evaluate`, the entry point) -> ``load`` (models, held-out
rows) -> ``strided`` | ``structured`` (rollouts and scoring per mode) -> ``execute`` and ``sandbox``
(unit tests of code rows) -> ``output`` (table, JSON); ``metrics`` is the pure arithmetic (CFM, best-of-n,
CE masks, pass@k, paired comparison) and ``result`` the returned containers.
"""
