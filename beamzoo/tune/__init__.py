"""``beamzoo tune``: the cheapest configuration of a whole graph that meets its targets.

As Llama does it: each step's cost is measured per knob value on a sample
(from the per-step metrics), branch probabilities are measured (the escalated
fraction at each threshold), and the costs are composed into a predicted
throughput, latency, agreement and cost for every configuration of the space
the graph's knobs declare (``Knob.tune``) and the zoo's variants; the cheapest
configuration predicted to meet every target is run on the sample and
reported, predicted against measured. ``beamzoo.tune.result`` holds what a
tuning run finds; ``beamzoo.tune.config`` the file the pipelines read.
"""
