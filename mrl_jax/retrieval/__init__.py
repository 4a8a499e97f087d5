"""An MRL-native vector index: nested prefixes stored once, searched by adaptive or funnel plans.

  prefix_store.py  unit-normalised dim-prefixes of the database in float32, float16 or int8
                   (per-dimension scales), and the exact candidate rerank on them
  ann.py           faiss HNSW / IVF shortlists on a small prefix; AdANNS IVF (clusters
                   learnt on one prefix, lists scanned at another)
  exact_stage.py   exact top-k over a stored prefix (blocked scan or jax.lax.approx_max_k)
  plans.py         search plans: exact at a size, adaptive, funnel, a target to meet
  index.py         `Index`: build / add / search / calibrate / save / load
  errors.py        the user errors of all of the above
"""
