"""benchmarks/lookahead_recall.py against the runtime: at lead 1 its guess is the prefetcher's late guess,
so on the trained model the two must find the same recall over the same teacher-forced tokens."""

import torch
from transformers import AutoModelForCausalLM

import offload
from benchmarks.lookahead_recall import recall_by_lead


def test_lead_one_is_the_runtimes_late_guess(trained_model_dir):
    model = offload.load(str(trained_model_dir), device="cpu", slots=8, prefetch="late")
    ids = model.tokenizer("def wrap(text, width=70):\n    lines = []\n    for word in text.split():\n")["input_ids"]
    model.reset()
    for position, token in enumerate(ids):  # one token at a time: every step guesses
        model.forward(torch.tensor([token]), position)
    runtime = model.stats.total
    hf = AutoModelForCausalLM.from_pretrained(str(trained_model_dir), dtype=torch.float32).eval()
    by_lead = recall_by_lead(hf, [ids])
    recall, counted = by_lead[1]
    assert counted == runtime.guess_total == len(ids) * 2 * 5  # top 2 at layers 1..5
    assert abs(recall * counted - runtime.guess_right) <= 1  # at most one near-tie apart
    assert sorted(by_lead) == [1, 2, 3, 4, 5] and by_lead[5][1] == len(ids) * 2  # lead 5: layer 5 from layer 0
