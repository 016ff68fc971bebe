"""Train imp-tiny, impq's embedded reference model, on the "shapes" task, on the CPU.

    python scripts/train_imp_tiny.py --minutes 45 --out impq/assets/imp-tiny

Imp phi-msft layout: SigLIP-style tower (168 px, patch 14: 144 vision tokens, 4 layers), mlp2x_gelu projector,
Phi-2-style LLM (hidden 256, 4 layers), byte-level BPE tokenizer, Imp's Phi-2 prompt template. Each training
sequence holds one scene and one turn per question type, packed behind a shared image prefix with an attention
mask that keeps the turns independent (each is exactly the evaluation prompt). A quarter of the batches run at a lower resolution with
interpolated position embeddings, so that lower resolutions degrade gracefully instead of breaking.
Writes the F16 checkpoint and `training.json` (command, seed, time, accuracy) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

from impq.datasets import shapes
from impq.families import TEXT_FAMILIES
from impq.models.layouts import read_spec
from impq.models.lmm import LMM
from impq.models.reduction import vision_reduction
from impq.models.testing import Dims, build_tokenizer, make_model

DIMS = Dims(hidden=256, layers=4, heads=4, kv_heads=4, intermediate=1024, v_hidden=192, v_intermediate=768,
            v_heads=3, v_layers_stored=4, image_size=168, patch=14, vocab_rows=448)
LOW_RESOLUTIONS = (84, 112, 140)


def tokenizer_corpus(n_scenes: int = 3000) -> list[str]:
    system = TEXT_FAMILIES["phi2"].prompt_template.split(" USER:")[0]
    lines = [system + " USER: ", " ASSISTANT:"]
    for seed in range(n_scenes):
        _, qas = shapes.sample(seed, n_questions=3)
        lines += [f"\n{qa['question']} ASSISTANT: {qa['answer']}" for qa in qas]
        lines += [f" USER: {qa['question']} ASSISTANT:" for qa in qas]
    return lines


def encode_turns(lmm: LMM, qas: list[dict]) -> tuple[list[int], list[tuple[list[int], list[int]]]]:
    """(ids before the image, one (ids, labels) per question: the evaluation prompt's text after the image, then
    the answer and </s>; labels are -100 except for the answer and </s>)."""
    tok = lmm.tokenizer
    turns = []
    for qa in qas:
        before, after = tok.encode_prompt(lmm.spec.prompt(qa["question"]), lmm.spec.image_token)
        answer = tok.encode(f" {qa['answer']}") + [tok.eos_id]
        turns.append((list(after) + answer, [-100] * len(after) + answer))
    return list(before), turns


def turn_mask(prefix: int, turn_lengths: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive attention mask [length, length] and position ids for a shared prefix (system prompt and image)
    followed by independent turns: each turn sees the prefix and itself only, at the positions it would have
    alone, so that no answer can be read from another question's text and every turn is the evaluation prompt."""
    allowed = torch.zeros(length, length, dtype=torch.bool)
    positions = torch.zeros(length, dtype=torch.long)
    allowed[:prefix, :prefix] = torch.tril(torch.ones(prefix, prefix, dtype=torch.bool))
    positions[:prefix] = torch.arange(prefix)
    start = prefix
    for n in turn_lengths:
        allowed[start:start + n, :prefix] = True
        allowed[start:start + n, start:start + n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
        positions[start:start + n] = torch.arange(prefix, prefix + n)
        start += n
    allowed[start:, start:] = torch.eye(length - start, dtype=torch.bool)     # padding attends to itself only
    return torch.where(allowed, 0.0, torch.finfo(torch.float32).min), positions


def batch_loss(lmm: LMM, aux: torch.nn.ModuleList, seeds: list[int], size: int, turns: int) -> torch.Tensor:
    images, sequences, labels = [], [], []
    grid = size // DIMS.patch
    for seed in seeds:
        image, qas, objects = shapes.sample_scene(seed, n_questions=turns)
        images.append(lmm.pixels(image, size))
        sequences.append(encode_turns(lmm, qas))
        labels.append(shapes.patch_labels(objects, grid))
    states = lmm.vision_states(torch.cat(images))
    # auxiliary per-patch targets (colour, shape, digit, side under each patch) give the tower a direct signal;
    # the few digit patches would drown among "no digit" ones, so that class weighs little
    targets = torch.tensor(labels)                                        # [B, patches, 4]
    digit_weights = torch.ones(11)
    digit_weights[10] = 0.05
    aux_loss = sum(torch.nn.functional.cross_entropy(head(states).flatten(0, 1).float(), targets[..., k].flatten(),
                                                     weight=digit_weights if k == 2 else None)
                   for k, head in enumerate(aux))
    features = lmm.projector(states)
    embed = lmm.llm.get_input_embeddings()
    rows, label_rows, layouts = [], [], []
    for (before, turn_list), feats in zip(sequences, features):
        ids = [t for turn, _ in turn_list for t in turn]
        rows.append(torch.cat([embed(torch.tensor(before)), feats, embed(torch.tensor(ids))]))
        prefix = len(before) + feats.shape[0]
        label_rows.append([-100] * prefix + [t for _, lab in turn_list for t in lab])
        layouts.append((prefix, [len(turn) for turn, _ in turn_list]))
    length = max(r.shape[0] for r in rows)
    inputs = torch.zeros(len(rows), length, rows[0].shape[1])
    masks = torch.zeros(len(rows), 1, length, length)
    positions = torch.zeros(len(rows), length, dtype=torch.long)
    answer_targets = torch.full((len(rows), length), -100)
    for i, (row, lab, (prefix, lengths)) in enumerate(zip(rows, label_rows, layouts)):
        inputs[i, :row.shape[0]] = row
        masks[i, 0], positions[i] = turn_mask(prefix, lengths, length)
        answer_targets[i, :len(lab)] = torch.tensor(lab)
    return lmm.llm(inputs_embeds=inputs, attention_mask=masks, position_ids=positions,
                   labels=answer_targets).loss, aux_loss


@torch.no_grad()
def quick_accuracy(lmm: LMM, n: int, size: int | None = None) -> float:
    """Exact-match accuracy on n held-out scenes (seeds far from the training range), single-turn greedy."""
    lmm.eval()
    correct = 0
    for i in range(n):
        image, qas = shapes.sample(30_000_000 + i, n_questions=1)
        gen = lmm.generate(image, qas[0]["question"], max_new_tokens=4,
                           reduction=vision_reduction(lmm.spec.vision, size))
        answer = lmm.tokenizer.decode([t for t in gen.tokens if t != lmm.tokenizer.eos_id]).strip().lower()
        correct += answer == qas[0]["answer"]
    lmm.train()
    return correct / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--minutes", type=float, default=45.0, help="training time budget")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--turns", type=int, default=7, help="question/answer turns per training sequence")
    parser.add_argument("--aux-weight", type=float, default=0.5, help="weight of the per-patch auxiliary loss")
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--init", type=Path, default=None,
                        help="continue from a checkpoint written by this script (its training.json is extended)")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)

    previous = None
    if args.init is not None:
        previous = json.loads((args.init / "training.json").read_text())
        lmm = LMM(read_spec(args.init))
        tokenizer = lmm.tokenizer.tokenizer
        lmm.float()
    else:
        work = Path(tempfile.mkdtemp(prefix="imp-tiny-"))
        tokenizer = build_tokenizer("phi2", vocab_size=DIMS.vocab_rows - 8, corpus=tokenizer_corpus())
        make_model("imp-phi2", work / "init", dims=DIMS, tokenizer=tokenizer, seed=args.seed)
        lmm = LMM(read_spec(work / "init"))
        # the generator spreads test models' logits with a 4x output head; a trained model starts from 1/sqrt(fan_in)
        torch.nn.init.normal_(lmm.llm.lm_head.weight, std=DIMS.hidden ** -0.5)
    lmm.train()
    # training-only heads on the vision tower (not saved): colour (7), shape (6), digit (11) and the object's
    # side of the image (3) per patch; without the side target the LLM never learned left/right (55 %)
    aux = torch.nn.ModuleList([torch.nn.Linear(DIMS.v_hidden, n) for n in (1 + len(shapes.COLORS),
                                                                           1 + len(shapes.SHAPES), 11, 3)])
    params = [p for p in lmm.parameters() if p.requires_grad] + list(aux.parameters())
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))

    budget = args.minutes * 60
    start = time.time()
    step, next_seed, log = 0, 0, []
    if previous is not None:                 # fresh scenes: continue where the earlier run's seeds stopped
        next_seed = previous["training_sequences"]
    warmup = 300 if previous is None else 50
    while True:
        elapsed = time.time() - start
        if elapsed > budget:
            break
        progress = elapsed / budget
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        size = rng.choice(LOW_RESOLUTIONS) if rng.random() < 0.25 else DIMS.image_size
        seeds = list(range(next_seed, next_seed + args.batch))
        next_seed += args.batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            answer_loss, aux_loss = batch_loss(lmm, aux, seeds, size, args.turns)
            loss = answer_loss + args.aux_weight * aux_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        step += 1
        if step % args.log_every == 0:
            entry = {"step": step, "minutes": round((time.time() - start) / 60, 2),
                     "answer_loss": round(answer_loss.item(), 4), "aux_loss": round(aux_loss.item(), 4),
                     "lr": round(lr, 6)}
            if step % (args.log_every * 6) == 0:
                entry["quick_accuracy"] = quick_accuracy(lmm, 70)
            log.append(entry)
            print(json.dumps(entry), flush=True)

    train_minutes = (time.time() - start) / 60
    lmm.eval()
    state = {f"llm.{k}": v for k, v in lmm.llm.state_dict().items()}
    state.update({f"vision.vision_model.{k}": v for k, v in lmm.vision.state_dict().items()})
    state.update({f"projector.{k}": v for k, v in lmm.projector.state_dict().items()})
    make_model("imp-phi2", args.out, dims=DIMS, tokenizer=tokenizer, values=state.__getitem__)
    final = {"quick_accuracy_native": quick_accuracy(lmm, 140),
             "quick_accuracy_half": quick_accuracy(lmm, 140, size=DIMS.image_size // 2)}
    record = {"command": " ".join(["python", *sys.argv]), "seed": args.seed, "steps": step,
              "train_minutes": round(train_minutes, 1), "training_sequences": next_seed, "batch": args.batch,
              "turns_per_sequence": args.turns, "threads": torch.get_num_threads(), **final, "log": log}
    if previous is not None:
        record["continued_from"] = previous
        record["total_train_minutes"] = round(train_minutes + previous.get("total_train_minutes",
                                                                           previous["train_minutes"]), 1)
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(final))


if __name__ == "__main__":
    main()
