"""benchmarks/lookahead_recall.py against the runtime: at lead 1 its guess is the prefetcher's late guess,
and at lead n the guess `--prefetch-ahead n` makes first, so on the trained model the two must find the
same recall over the same teacher-forced tokens."""

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


def test_each_lead_of_the_prefetch_ahead_guesses_what_transformers_does(trained_model_dir):
    """With the output guess reaching every later layer, the guesses made `lead` layers early have the
    recall recall_by_lead computes from transformers' own hidden states, lead by lead."""
    model = offload.load(str(trained_model_dir), device="cpu", slots=3, prefetch="late", prefetch_ahead=5)
    layers, k = model.config.num_layers, model.config.top_k
    ids = model.tokenizer("class Stack:\n    def push(self, item):\n        self.items.append(item)\n")["input_ids"]
    chosen: dict[tuple[int, int], list[int]] = {}  # (position, layer) -> the experts it asked for
    guessed: list[tuple[int, int, int, list[int]]] = []  # (position, source layer, target layer, guess)
    prefetcher, fetch = model.moe.prefetcher, model.cache.fetch
    position = 0

    def record_guesses(layer, guesses):
        for i, target in enumerate(prefetcher.targets(layer)):
            guessed.append((position, layer, target, [int(e) for e in guesses[i * k : (i + 1) * k]]))
        prefetcher_start(layer, guesses)

    def record_request(layer, experts, weights=None):
        chosen[position, layer] = list(experts)
        return fetch(layer, experts, weights)

    prefetcher_start, prefetcher.start, model.cache.fetch = prefetcher.start, record_guesses, record_request
    model.reset()
    for position, token in enumerate(ids):
        model.forward(torch.tensor([token]), position)

    # every layer's output guesses every later layer, nearest first
    assert [(s, t) for p, s, t, _ in guessed if p == 0] == [(s, t) for s in range(layers) for t in range(s + 1, layers)]
    right: dict[int, int] = {}
    for p, source, target, guess in guessed:
        right[target - source] = right.get(target - source, 0) + len(set(guess) & set(chosen[p, target]))
    hf = AutoModelForCausalLM.from_pretrained(str(trained_model_dir), dtype=torch.float32).eval()
    for lead, (recall, counted) in recall_by_lead(hf, [ids]).items():
        assert counted == len(ids) * k * (layers - lead)
        assert abs(recall * counted - right[lead]) <= 1, f"lead {lead}"  # at most one near-tie apart
    # the last guess of each layer is the lead-1 one: the recall the cache counts is the late guess's
    assert model.stats.total.guess_right == right[1]
