"""Build the package's compact human gene -> GO term table and alias table.

Source: Debian's ``r-bioc-org.hs.eg.db`` (Bioconductor org.Hs.eg.db 3.16, NCBI gene2go 2022-09).
The SQLite file inside that package is read directly; nothing else is needed.

    apt-get download r-bioc-org.hs.eg.db
    dpkg-deb -x r-bioc-org.hs.eg.db_*.deb /tmp/orghs
    python tools/build_go_table.py /tmp/orghs/usr/lib/R/site-library/org.Hs.eg.db/extdata/org.Hs.eg.sqlite

Outputs (in gears_dist/data/resources/):
  go_human.tsv.gz     symbol <TAB> space-separated GO term numbers (GO:0005576 -> 5576)
  alias_human.tsv.gz  alias <TAB> current symbol (only aliases that name exactly one gene and are
                      not themselves a current symbol)
  go_human.json       provenance: source package, release, dates, counts, evidence codes kept
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import sqlite3

OUT_DIR = pathlib.Path(__file__).resolve().parents[1] / "gears_dist" / "data" / "resources"
# "ND" (no biological data available) annotates the root term only: it carries no signal and would
# make every ND gene similar to every other.
EXCLUDED_EVIDENCE = ("ND",)


def build(sqlite_path: str, out_dir: pathlib.Path = OUT_DIR) -> dict:
    con = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    meta = dict(con.execute("select name, value from metadata"))
    symbol_of = dict(con.execute("select _id, symbol from gene_info"))

    terms = collections.defaultdict(set)
    placeholders = ",".join("?" * len(EXCLUDED_EVIDENCE))
    for gid, go_id in con.execute(
        f"select _id, go_id from go where evidence not in ({placeholders})", EXCLUDED_EVIDENCE
    ):
        terms[symbol_of[gid]].add(int(go_id.split(":")[1]))

    current = set(symbol_of.values())
    alias_targets = collections.defaultdict(set)
    for gid, alias in con.execute("select _id, alias_symbol from alias"):
        if alias not in current:
            alias_targets[alias].add(symbol_of[gid])
    aliases = {a: next(iter(t)) for a, t in alias_targets.items() if len(t) == 1}

    out_dir.mkdir(parents=True, exist_ok=True)
    # mtime=0 keeps the files byte-identical across rebuilds of the same source.
    with gzip.GzipFile(out_dir / "go_human.tsv.gz", "wb", mtime=0) as fh:
        for sym in sorted(terms):
            fh.write(f"{sym}\t{' '.join(map(str, sorted(terms[sym])))}\n".encode())
    with gzip.GzipFile(out_dir / "alias_human.tsv.gz", "wb", mtime=0) as fh:
        for a in sorted(aliases):
            fh.write(f"{a}\t{aliases[a]}\n".encode())
    info = {
        "source": "Debian package r-bioc-org.hs.eg.db (Bioconductor org.Hs.eg.db)",
        "organism": meta.get("ORGANISM"),
        "gene_source_date": meta.get("EGSOURCEDATE"),
        "go_source_date": meta.get("GOSOURCEDATE"),
        "gene2go_date": meta.get("GOEGSOURCEDATE"),
        "go_table": "go (direct annotations, BP+MF+CC)",
        "excluded_evidence": list(EXCLUDED_EVIDENCE),
        "num_genes": len(terms),
        "num_annotations": sum(len(t) for t in terms.values()),
        "num_terms": len(set().union(*terms.values())),
        "num_aliases": len(aliases),
        "num_ambiguous_aliases_dropped": sum(1 for t in alias_targets.values() if len(t) > 1),
    }
    (out_dir / "go_human.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sqlite", help="path to org.Hs.eg.sqlite")
    p.add_argument("--out-dir", type=pathlib.Path, default=OUT_DIR)
    args = p.parse_args()
    print(json.dumps(build(args.sqlite, args.out_dir), indent=2))


if __name__ == "__main__":
    main()
