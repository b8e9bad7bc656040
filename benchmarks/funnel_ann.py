r"""Adaptive retrieval on an ANN engine: the funnel with a FAISS HNSW / IVF first stage.

  python benchmarks/funnel_ann.py --workdir=WORKDIR [--index=hnsw] [--ef_search=32,64,128]

WORKDIR holds `--mode=embed` exports of the train split (database) and the
test split (queries): `WORKDIR/embeddings/{train,test}/`. For the paper's two
funnels on the model's nesting dims (`funnel.default_funnels`), prints
mAP@10, the share of the exact top-10 found, vectors scored per query,
MFLOPs per query and the measured search time against FAISS's exact
`IndexFlatIP` at the full dim on the same queries (index build time apart),
once per efSearch (HNSW; at least the shortlist size, which a search needs)
or nprobe (IVF) value; then the same funnels with an
exact (brute force) first stage. Times are one search over all queries on
this machine; FAISS uses every core.
"""
from __future__ import annotations

import argparse
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mrl_jax import export  # noqa: E402
from mrl_jax.evaluators import funnel  # noqa: E402


def table(rows, note: str) -> str:
  head = ("| search | first stage | stages | mAP@10 | recall of exact | distances/query "
          "| MFLOPs/query | time (s) | of which first stage | speedup |")
  lines = [note, "", head, "|" + "---|" * 10]
  for name, row in rows.items():
    stages = " → ".join(f"{m}:{k}" for m, k in row["stages"])
    recall = row.get("recall_of_exact")
    lines.append(
        f"| {name} | {row.get('first_stage', 'exact (XLA)')} | {stages} | "
        f"{100 * row['map@10']:.2f} | {'–' if recall is None else f'{100 * recall:.1f} %'} | "
        f"{row.get('distances_per_query', float('nan')):.0f} | "
        f"{row['mflops_per_query']:.3f} | {row['seconds']:.3f} | "
        f"{row.get('first_stage_seconds', float('nan')):.3f} | {row['speedup_vs_exact']:.1f}x |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--index", default="hnsw", choices=["hnsw", "ivf"])
  parser.add_argument("--ef_search", default="200,400",
                      help="HNSW efSearch values (or IVF nprobe values with --index=ivf).")
  parser.add_argument("--hnsw_m", type=int, default=32)
  args = parser.parse_args()
  emb = pathlib.Path(args.workdir) / "embeddings"
  db, db_labels, meta = export.load_embeddings(emb / "train")
  queries, q_labels, _ = export.load_embeddings(emb / "test")
  funnels = funnel.default_funnels(meta["nesting_dims"], 10)
  print(f"database {db.shape}, queries {queries.shape}, nesting dims {meta['nesting_dims']}\n")
  for value in (int(v) for v in args.ef_search.split(",")):
    options = ({"hnsw_m": args.hnsw_m, "ef_search": value} if args.index == "hnsw"
               else {"nprobe": value})
    rows = funnel.funnel_metrics(queries, q_labels, db, db_labels, funnels, [10],
                                 index=args.index, index_options=options)
    for name, row in rows.items():
      row["stages"] = [[db.shape[1], 10]] if name == "exact" else funnels[name]
    print(table(rows, f"{args.index} {options}; 'exact' = FAISS IndexFlatIP at "
                      f"{db.shape[1]} dims; index build "
                      f"{max(r['build_seconds'] for r in rows.values()):.2f} s") + "\n",
          flush=True)
  rows = funnel.funnel_metrics(queries, q_labels, db, db_labels, funnels, [10])
  for name, row in rows.items():
    row["stages"] = [[db.shape[1], 10]] if name == "exact" else funnels[name]
  print(table(rows, "Brute force first stage (`knn.knn_search`, XLA); 'exact' = the same "
                    "search at the full dim"))


if __name__ == "__main__":
  main()
