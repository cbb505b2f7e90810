"""Token embeddings as vectors: nearest tokens by cosine similarity, a 2-D PCA projection, word analogies
(a - b + c), and the export of vectors for the TensorBoard Embedding Projector."""

from __future__ import annotations

from pathlib import Path

import torch


def word_vector(embeddings: torch.Tensor, tokenizer, word: str) -> tuple[torch.Tensor, list[int]]:
    """Mean embedding of the word's tokens, preferring the spelling (with or without a leading space) that
    takes fewer tokens (byte-level BPE learns " word" as one token far more often than "word")."""
    spellings = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" " + word, word)]
    ids = min((s for s in spellings if s), key=len)
    return embeddings[ids].mean(0), ids


def nearest_tokens(model, tokenizer, words: list[str], k: int) -> list[dict]:
    """For each word, the k most cosine-similar vocabulary tokens (specials and the word itself excluded)."""
    emb = model.get_input_embeddings().weight.detach().float()
    unit = torch.nn.functional.normalize(emb, dim=-1)
    rows = []
    for word in words:
        vec, ids = word_vector(emb, tokenizer, word)
        sims = unit @ torch.nn.functional.normalize(vec, dim=0)
        sims[list(set(ids) | set(tokenizer.all_special_ids))] = -2.0
        top = sims.topk(k)
        for rank, (score, idx) in enumerate(zip(top.values.tolist(), top.indices.tolist()), 1):
            rows.append({"word": word, "rank": rank, "token": tokenizer.decode([idx]), "token_id": idx,
                         "cosine": round(score, 4)})
    return rows


def projection(model, tokenizer, n: int) -> tuple[torch.Tensor, list[str]]:
    """The first n non-special token embeddings projected on their top two principal components."""
    emb = model.get_input_embeddings().weight.detach().float()
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(emb.shape[0], len(tokenizer))) if i not in special][:n]
    x = emb[ids] - emb[ids].mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)  # exact PCA; the matrix is small
    return x @ v[:2].T, [tokenizer.decode([i]) for i in ids]


def plot_projection(points: torch.Tensor, labels: list[str], path: Path, title: str, annotate: int = 80) -> None:
    """Scatter the projected tokens and label a spread-out subset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 6))
    ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.5)
    step = max(1, len(labels) // annotate)
    for i in range(0, len(labels), step):
        ax.annotate(labels[i].replace("\n", "\\n"), (float(points[i, 0]), float(points[i, 1])), fontsize=7)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def analogies(model, tokenizer, items: list[tuple[str, str, str, str]], k: int) -> list[dict]:
    """For each (a, b, c, d): the k tokens nearest a - b + c and the rank of d, with unit vectors (3CosAdd,
    Mikolov et al. 2013; Levy & Goldberg 2014). As in word2vec's test the question words are not answers: a, b or c
    that is one token is left out (one that takes several is no candidate anyway), and so are the specials.

    d's rank is 1 + the number of candidate tokens more cosine-similar to the target than d's own vector (its
    token, or the mean of its tokens: word_vector), so a d that takes several tokens still gets a rank."""
    emb = model.get_input_embeddings().weight.detach().float()[:len(tokenizer)]
    unit = torch.nn.functional.normalize(emb, dim=-1)
    rows = []
    for a, b, c, d in items:
        (va, ia), (vb, ib), (vc, ic) = (word_vector(emb, tokenizer, w) for w in (a, b, c))
        target = sum(torch.nn.functional.normalize(v, dim=0) * s for v, s in ((va, 1), (vb, -1), (vc, 1)))
        target = torch.nn.functional.normalize(target, dim=0)
        vd, idd = word_vector(emb, tokenizer, d)
        sims = unit @ target
        asked = {ids[0] for ids in (ia, ib, ic) if len(ids) == 1}
        sims[list(asked | set(tokenizer.all_special_ids))] = -2.0
        expected = float(sims[idd[0]]) if len(idd) == 1 else float(torch.nn.functional.normalize(vd, dim=0) @ target)
        rank = 1 + int((sims > expected).sum())
        top = sims.topk(k).indices.tolist()
        rows.append({"analogy": f"{a} - {b} + {c} = {d}", "answers": [tokenizer.decode([i]) for i in top],
                     "expected": d, "expected_tokens": len(idd), "rank": rank, "solved": rank == 1,
                     "in_top_k": rank <= k, "cosine_expected": round(expected, 4),
                     "cosine_best": round(float(sims[top[0]]), 4)})
    return rows


def token_table(tokenizer, n: int, rows: int) -> tuple[list[int], list[list[str]]]:
    """The first n non-special token ids (below `rows`, the embedding matrix's) and their metadata rows (token
    text, id) for the projector."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(min(rows, len(tokenizer))) if i not in special][:n]
    return ids, [[tokenizer.decode([i]), str(i)] for i in ids]


def write_projector(folder: Path, tables: list[tuple[str, torch.Tensor, list[str], list[list[str]]]]) -> Path:
    """Write vectors for the TensorBoard Embedding Projector: per table `<name>.tsv` (one vector a line, values
    tab-separated, no header), `<name>_metadata.tsv` (a header line naming the columns, then one line per vector)
    and one `projector_config.pbtxt` (a ProjectorConfig text proto: an `embeddings` entry per table with its
    tensor_path and metadata_path relative to the folder). `tensorboard --logdir FOLDER` opens it in the
    Projector tab; projector.tensorflow.org's Load button takes a vectors file and its metadata file."""
    from components.lib.io import write_text_atomic

    folder.mkdir(parents=True, exist_ok=True)
    config = []
    for name, vectors, header, meta in tables:
        if len(meta) != vectors.shape[0]:
            raise ValueError(f"projector table {name}: {vectors.shape[0]} vectors but {len(meta)} metadata rows")
        write_text_atomic(folder / f"{name}.tsv", "".join("\t".join(f"{x:.6g}" for x in row) + "\n"
                                                          for row in vectors.tolist()))
        write_text_atomic(folder / f"{name}_metadata.tsv", "".join("\t".join(_cell(c) for c in row) + "\n"
                                                                   for row in [header, *meta]))
        config.append(f'embeddings {{\n  tensor_name: "{name}"\n  tensor_path: "{name}.tsv"\n'
                      f'  metadata_path: "{name}_metadata.tsv"\n  tensor_shape: {vectors.shape[0]}\n'
                      f"  tensor_shape: {vectors.shape[1]}\n}}\n")
    write_text_atomic(folder / "projector_config.pbtxt", "".join(config))
    return folder


def _cell(text: str) -> str:
    """A metadata cell on one line: tabs and line breaks escaped, an empty or blank token shown as its repr."""
    text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text if text.strip() else repr(text)
