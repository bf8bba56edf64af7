"""The paper's analyses as commands, on any trained model and its evaluation set (SPEC 9).

  python -m larvseg_jax.analysis.oracle          pixel-compactness oracle (paper Table 1)
  python -m larvseg_jax.analysis.response_maps   per-class cosine response maps (Fig. 2)
  python -m larvseg_jax.analysis.compare         several models side by side (Fig. 4)

Foreground-only rendering for huge vocabularies (Fig. 5) is `segment --foreground-only`
(`larvseg_jax.foreground`). `affinity` holds the computation the oracle and the response maps
share; `evalset` reads images and category sets the way evaluation does.
"""
