"""Exact and near duplicates, within a split and across splits (train/test leakage).

Recipe stage 1, 'become one with the data': duplicates inflate a split's weight and, across
splits, let the test set measure memory instead of generalisation.

Exact duplicates: a BLAKE2b content hash of each example's stored bytes (dtype and shape
included), grouped across all splits.

Near duplicates (images): two stages, both vectorised, memory bounded by the chunk size.
  1. Candidates: every example's K nearest neighbours, by cosine similarity, in two small
     embeddings: a blurred thumbnail (average-pooled to at most 8x8, mean-subtracted,
     unit-normalised: catches noised and re-encoded copies) and the log magnitude of the low
     2-D Fourier frequencies of the zero-padded image (invariant to small translations:
     catches shifted copies). Chunked matrix products of [CHUNK, d] x [d, N] with
     `np.argpartition`; no all-pairs Python loop, memory O(CHUNK * N).
  2. Verification, the similarity that is reported and thresholded: the largest cosine
     similarity of the two mean-subtracted images over every translation of up to `max_shift`
     pixels (default 1), compared on their overlapping window. An exact copy shifted by one
     pixel scores 1.0; a copy with Gaussian noise of 3% of the value range about 0.995 on
     mnist5k; the threshold (default 0.985) sits above almost all naturally similar pairs.
Non-image data (feature vectors, sequences): the candidates and the verified similarity are
the cosine of the standardised (per feature), mean-subtracted vectors, with no translation.
"""

import hashlib
from typing import Optional

import numpy as np

CHUNK = 512  # query rows per matrix-product block: 512 x 60,000 float32 = 123 MB at most
NEIGHBORS = 8
THUMB = 8  # thumbnail side
FREQS = 6  # low Fourier frequencies kept per axis
COMPRESS = 32  # dimensions of the candidate embedding after projection
SMALL_IMAGE = 16  # below this side, candidates are also searched from translated copies
SIMILARITY = ("max over translations of up to {s} pixel(s) of the cosine similarity of the two "
              "mean-subtracted images on their overlapping window")
SIMILARITY_FLAT = "cosine similarity of the standardised, mean-subtracted feature vectors"


def content_hashes(x: np.ndarray) -> np.ndarray:
  """BLAKE2b-128 hex digest of every example's bytes (shape and dtype included), [N] str."""
  x = np.ascontiguousarray(x)
  head = f"{x.dtype.str}{x.shape[1:]}".encode()
  return np.array([hashlib.blake2b(head + row.tobytes(), digest_size=16).hexdigest()
                   for row in x], dtype=object)


def exact_groups(hashes: np.ndarray) -> list[np.ndarray]:
  """Groups (arrays of row indices, in order) of rows sharing a hash, 2 rows or more each."""
  order = np.argsort(hashes, kind="stable")
  h = hashes[order]
  if len(h) == 0:
    return []
  starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
  ends = np.r_[starts[1:], len(h)]
  groups = [np.sort(order[s:e]) for s, e in zip(starts, ends) if e - s > 1]
  groups.sort(key=lambda g: g[0])
  return groups


def _unit(e: np.ndarray) -> np.ndarray:
  e = e.reshape(len(e), -1).astype(np.float32)
  e = e - e.mean(axis=1, keepdims=True)
  norm = np.linalg.norm(e, axis=1, keepdims=True)
  return np.divide(e, norm, out=np.zeros_like(e), where=norm > 0)


def _blur(x: np.ndarray) -> np.ndarray:
  """3x3 box blur of [N, H, W] (zero padding)."""
  h, w = x.shape[1:]
  p = np.pad(x, ((0, 0), (1, 1), (1, 1)))
  out = np.zeros_like(x)
  for i in range(3):
    for j in range(3):
      out += p[:, i:i + h, j:j + w]
  return out / 9.0


def _pool(x: np.ndarray, side: int = THUMB) -> np.ndarray:
  n, h, w = x.shape
  f = max(1, int(np.ceil(max(h, w) / side)))
  hh, ww = -(-h // f) * f, -(-w // f) * f
  x = np.pad(x, ((0, 0), (0, hh - h), (0, ww - w)))
  return x.reshape(n, hh // f, f, ww // f, f).mean(axis=(2, 4))


def gray(x: np.ndarray) -> np.ndarray:
  """Images [N, H, W] or [N, H, W, C] of any dtype -> float32 [N, H, W], non-finite -> 0."""
  x = np.nan_to_num(np.asarray(x, np.float32), nan=0.0, posinf=0.0, neginf=0.0)
  return x.mean(axis=-1) if x.ndim == 4 else x


def image_embeddings(img: np.ndarray, shift: tuple = (0, 0)) -> list[np.ndarray]:
  """The candidate embedding of images [N, H, W(, C)], optionally translated by `shift`:
  [thumbnail, Fourier] / sqrt(2), converted to float in chunks (bounded memory).

  Rows are unit-norm float32; the cosine of two rows is the mean of the cosines of their
  thumbnails and of their Fourier magnitudes.
  """
  out_thumb = np.empty((len(img), len(_pool(gray(img[:1])).ravel())), np.float32)
  k = FREQS
  fsize = None
  parts_fft = []
  for s in range(0, len(img), 4096):
    b = gray(img[s:s + 4096])
    if shift != (0, 0):
      b = _translate(b, *shift)
    out_thumb[s:s + len(b)] = _unit(_pool(_blur(b)))
    f = np.abs(np.fft.rfft2(np.pad(b, ((0, 0), (2, 2), (2, 2)))))
    kk = min(k, f.shape[1] // 2, f.shape[2])
    f = np.concatenate([f[:, :kk, :kk], f[:, f.shape[1] - kk + 1:, :kk]], axis=1)
    parts_fft.append(_unit(np.log1p(f)))
    fsize = parts_fft[-1].shape[1]
  fft = np.concatenate(parts_fft) if parts_fft else np.zeros((0, fsize or 1), np.float32)
  return [np.concatenate([out_thumb, fft], axis=1) / np.float32(np.sqrt(2.0))]


def flat_embedding(x: np.ndarray, max_dim: int = 256, seed: int = 0) -> tuple:
  """(candidate embedding, verification vectors) for non-image data, both unit rows."""
  f = np.nan_to_num(np.asarray(x, np.float32).reshape(len(x), -1))
  std = f.std(axis=0)
  f = (f - f.mean(axis=0)) / np.where(std > 0, std, 1.0)
  full = _unit(f)
  if full.shape[1] > max_dim:  # random projection keeps cosines approximately (J-L)
    rng = np.random.default_rng(seed)
    proj = rng.normal(size=(full.shape[1], max_dim)).astype(np.float32) / np.sqrt(max_dim)
    return _unit(full @ proj), full
  return full, full


_TOPK_CACHE: dict = {}


GROUP = 128  # columns per group of the two-stage top-k
TILE = 4096  # columns per matrix-product tile (keeps each product's output in cache)
SMALL_SEARCH = 16384  # up to this many rows: one product and lax.top_k, no padding


def _topk_fn(k: int, n: int):
  """jit((q [B, d], E [M, d]) -> [B, k] indices of the k largest q @ E.T per row).

  Up to SMALL_SEARCH rows: `lax.top_k(q @ E.T)`. Beyond: M is a multiple of TILE, rows >= n
  of E are padding, and the search runs in two stages, exactly: the k largest
  entries of a row lie in the k column groups (of GROUP columns) with the largest maxima
  (were one outside them, those k groups would hold k larger entries). Stage 1 runs over
  column tiles and keeps only each group's maximum, so the [B, M] similarity matrix is
  never stored; stage 2 recomputes the k * GROUP candidate similarities and takes their
  top k. About 1.3x faster than `lax.top_k(q @ E.T)` on 60,000 rows and O(B * M / GROUP)
  memory.
  """
  key = (k, n)
  fn = _TOPK_CACHE.get(key)
  if fn is None and n <= SMALL_SEARCH:
    import jax
    fn = _TOPK_CACHE[key] = jax.jit(lambda q, e: jax.lax.top_k(q @ e.T, k)[1])
  if fn is None:
    import jax
    import jax.numpy as jnp

    def f(q, e):
      b, m, d = q.shape[0], e.shape[0], e.shape[1]

      def tile(args):
        t, rows = args
        s = q @ rows.T
        s = jnp.where((t * TILE + jnp.arange(TILE))[None, :] < n, s, -jnp.inf)
        return s.reshape(b, TILE // GROUP, GROUP).max(axis=2)

      gmax = jax.lax.map(tile, (jnp.arange(m // TILE), e.reshape(m // TILE, TILE, d)))
      gmax = jnp.transpose(gmax, (1, 0, 2)).reshape(b, m // GROUP)
      _, gi = jax.lax.top_k(gmax, k)  # [b, k] groups
      rows = e.reshape(m // GROUP, GROUP, d)[gi]  # [b, k, GROUP, d]
      s = jnp.einsum("bd,bkgd->bkg", q, rows).reshape(b, k * GROUP)
      cols = (gi[:, :, None] * GROUP + jnp.arange(GROUP)[None, None, :]).reshape(b, -1)
      _, ci = jax.lax.top_k(jnp.where(cols < n, s, -jnp.inf), k)
      return jnp.take_along_axis(cols, ci, axis=1)

    fn = _TOPK_CACHE[key] = jax.jit(f)
  return fn


def directions(emb: np.ndarray, dims: int = COMPRESS, fit_rows: int = 4000,
               seed: int = 0) -> Optional[np.ndarray]:
  """[d, dims] leading uncentred principal directions of `emb` (None if d <= dims): the
  projection that best keeps dot products, so cosine neighbours survive, and makes the
  neighbour search's matrix products several times cheaper."""
  if emb.shape[1] <= dims:
    return None
  rng = np.random.default_rng(seed)
  fit = emb[rng.choice(len(emb), min(len(emb), fit_rows), replace=False)].astype(np.float64)
  _, vecs = np.linalg.eigh(fit.T @ fit)
  return vecs[:, ::-1][:, :dims].astype(np.float32)


def project(emb: np.ndarray, dirs: Optional[np.ndarray]) -> np.ndarray:
  """Unit rows of emb @ dirs (emb itself when dirs is None)."""
  if dirs is None:
    return emb
  out = emb @ dirs
  norm = np.linalg.norm(out, axis=1, keepdims=True)
  return np.divide(out, norm, out=np.zeros_like(out), where=norm > 0)


def neighbours(query: np.ndarray, base: np.ndarray, k: int) -> np.ndarray:
  """[M, k] rows of `base` most cosine-similar to each row of `query` (unit-norm rows, most
  similar first), in padded chunks of CHUNK queries (memory O(CHUNK * len(base)))."""
  import jax.numpy as jnp
  n = len(base)
  k = int(min(k, n))
  fn = _topk_fn(k, n)
  padded = -(-n // TILE) * TILE if n > SMALL_SEARCH else n
  all_rows = jnp.asarray(np.concatenate([base, np.zeros((padded - n, base.shape[1]),
                                                          base.dtype)]) if padded > n else base)
  b = max(1, min(CHUNK, len(query)))
  out = []
  for s in range(0, len(query), b):
    q = query[s:s + b]
    real = len(q)
    if real < b:
      q = np.concatenate([q, np.zeros((b - real, query.shape[1]), query.dtype)])
    out.append(np.asarray(fn(q, all_rows))[:real])
  return np.concatenate(out) if out else np.zeros((0, k), np.int64)


def nearest_candidates(emb: np.ndarray, k: int = NEIGHBORS,
                       queries: Optional[list] = None) -> np.ndarray:
  """[M, 2] int pairs (i < j): each row's k most cosine-similar other rows (unit-norm rows).

  `queries` (default [emb]): arrays aligned with `emb` whose row i stands for example i
  (e.g. the embeddings of example i translated by one pixel); each is searched against emb.
  """
  n = len(emb)
  k = min(k, n - 1)
  if k < 1:
    return np.zeros((0, 2), np.int64)
  pairs = []
  for query in queries or [emb]:
    nn = neighbours(query, emb, k + 1)  # + 1: a row is its own nearest neighbour
    i = np.repeat(np.arange(n), nn.shape[1])
    j = nn.ravel()
    keep = i != j
    i, j = i[keep], j[keep]
    pairs.append(np.stack([np.minimum(i, j), np.maximum(i, j)], axis=1))
  return np.unique(np.concatenate(pairs), axis=0)


def _translate(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
  """[N, H, W] images moved by (dy, dx) pixels, zero-filled."""
  out = np.zeros_like(x)
  h, w = x.shape[1:3]
  out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      x[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
  return out


def shift_similarity(a: np.ndarray, b: np.ndarray, max_shift: int = 1) -> np.ndarray:
  """[M] max over translations |dy|, |dx| <= max_shift of the cosine similarity of a and b
  (each mean-subtracted over the window) on their overlapping window; a, b float [M, H, W].

  One strided product per translation and window sums (no copies of the windows). A
  constant window has no direction: its similarity is 0.
  """
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  h, w = a.shape[1:]
  a2, b2 = a * a, b * b
  # Window sums from totals, row sums and column sums minus the (small) excluded corners.
  parts = {}
  for key, v in (("a", a), ("b", b), ("aa", a2), ("bb", b2)):
    rows = v.sum(axis=2, dtype=np.float64)
    parts[key] = (v, rows.sum(axis=1), rows, v.sum(axis=1, dtype=np.float64))

  def wsum(key, ys, xs):
    v, total, rows, cols = parts[key]
    out = total - rows[:, :ys[0]].sum(axis=1) - rows[:, ys[1]:].sum(axis=1)
    out = out - cols[:, :xs[0]].sum(axis=1) - cols[:, xs[1]:].sum(axis=1)
    for yy in ((0, ys[0]), (ys[1], h)):
      for xx in ((0, xs[0]), (xs[1], w)):
        if yy[1] > yy[0] and xx[1] > xx[0]:
          out = out + v[:, yy[0]:yy[1], xx[0]:xx[1]].sum(axis=(1, 2), dtype=np.float64)
    return out
  best = np.full(len(a), -1.0)
  for dy in range(-max_shift, max_shift + 1):
    for dx in range(-max_shift, max_shift + 1):
      # a[y, x] is compared with b[y - dy, x - dx] where both exist
      ya, xa = (max(dy, 0), h + min(dy, 0)), (max(dx, 0), w + min(dx, 0))
      yb, xb = (max(-dy, 0), h + min(-dy, 0)), (max(-dx, 0), w + min(-dx, 0))
      m = (ya[1] - ya[0]) * (xa[1] - xa[0])
      if m < 2:
        continue
      sab = np.einsum("nij,nij->n", a[:, ya[0]:ya[1], xa[0]:xa[1]],
                      b[:, yb[0]:yb[1], xb[0]:xb[1]], dtype=np.float64)
      sa, saa = wsum("a", ya, xa), wsum("aa", ya, xa)
      sb, sbb = wsum("b", yb, xb), wsum("bb", yb, xb)
      cov = sab - sa * sb / m
      var = np.maximum(saa - sa * sa / m, 0) * np.maximum(sbb - sb * sb / m, 0)
      with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(var > 1e-12 * (saa * sbb + 1e-30), cov / np.sqrt(var), 0.0)
      best = np.maximum(best, cos)
  return np.clip(best, -1.0, 1.0)


def near_duplicates(x: np.ndarray, *, image: bool, threshold: float, k: int = NEIGHBORS,
                    max_shift: int = 1, exclude_same: Optional[np.ndarray] = None) -> dict:
  """Near-duplicate pairs among all rows of `x` (splits concatenated by the caller).

  Args:
    x: [N, ...] inputs as stored (images [N, H, W] or [N, H, W, C]).
    image: use the image embeddings and the translation-tolerant similarity.
    threshold: pairs whose verified similarity is >= threshold are near duplicates.
    k: neighbours per row in each candidate embedding.
    max_shift: largest translation (pixels) the image similarity tolerates.
    exclude_same: optional [N] group keys (content hashes): pairs with equal keys (exact
      duplicates, reported as such) are left out.

  Returns:
    {'pairs': int [M, 2] (i < j), 'similarity': float [M] (sorted, highest first),
     'nn_index': int [N] each row's most similar verified candidate (-1: none),
     'nn_similarity': float [N] its similarity (NaN: none), 'description': str}.
  """
  n = len(x)
  if image:
    img = x  # converted to float32 grey images chunk by chunk
    embs = image_embeddings(img)
    dirs = directions(embs[0])
    embs = [project(embs[0], dirs)]
    queries = None
    if min(img.shape[1:3]) < SMALL_IMAGE:
      # A one-pixel shift moves a tiny image's thumbnail and spectrum a lot: search with
      # the embeddings of every translated copy as queries too.
      queries = [embs[0]] + [project(image_embeddings(img, (dy, dx))[0], dirs)
                             for dy in range(-max_shift, max_shift + 1)
                             for dx in range(-max_shift, max_shift + 1) if dy or dx]
    verify_data = img
  else:
    cand, verify_data = flat_embedding(x)
    embs, queries = [project(cand, directions(cand))], None
  cands = nearest_candidates(embs[0], k, queries) if n > 1 else np.zeros((0, 2), np.int64)
  sims = np.empty(len(cands), np.float32)
  for s in range(0, len(cands), 8192):
    c = cands[s:s + 8192]
    if image:
      sims[s:s + len(c)] = shift_similarity(gray(verify_data[c[:, 0]]),
                                            gray(verify_data[c[:, 1]]), max_shift)
    else:
      sims[s:s + len(c)] = (verify_data[c[:, 0]] * verify_data[c[:, 1]]).sum(axis=1)
  nn_index = np.full(n, -1, np.int64)
  nn_sim = np.full(n, np.nan, np.float64)
  if len(cands):
    # Per row, its best verified neighbour (a pair counts for both of its rows).
    best = np.full(n, -np.inf)
    np.maximum.at(best, cands[:, 0], sims)
    np.maximum.at(best, cands[:, 1], sims)
    hit0 = sims >= best[cands[:, 0]]
    hit1 = sims >= best[cands[:, 1]]
    nn_index[cands[hit0, 0]] = cands[hit0, 1]
    nn_index[cands[hit1, 1]] = cands[hit1, 0]
    nn_sim = np.where(np.isfinite(best), best, np.nan)
  keep = sims >= threshold
  if exclude_same is not None and len(cands):
    keep &= exclude_same[cands[:, 0]] != exclude_same[cands[:, 1]]
  pairs, psims = cands[keep], sims[keep]
  order = np.argsort(-psims, kind="stable")
  desc = (SIMILARITY.format(s=max_shift) + "; candidates: each example's "
          f"{k} nearest neighbours in a blurred {THUMB}x{THUMB} thumbnail and in low Fourier "
          "magnitudes") if image else SIMILARITY_FLAT
  return {"pairs": pairs[order], "similarity": psims[order].astype(np.float64),
          "nn_index": nn_index, "nn_similarity": nn_sim, "description": desc}
