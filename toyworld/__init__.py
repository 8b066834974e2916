"""Toy world: synthetic scenes of simple coloured shapes with exact ground truth, and the toy model.

`toyworld.scenes` samples and renders scenes, captions and edit pairs; `toyworld.classifier` reads
the attributes back from an image. Both depend only on numpy and Pillow (the classifier also uses
scipy.ndimage for connected components), never on torch.

`toyworld.model` is the toy text-to-image model and its file format. It is part of the pack: the
loader node imports it relative (``from ..toyworld.model import ...``), so it imports only the host
and third-party packages, and this __init__ imports nothing. Outside the pack import it through the
registered pack, ``from attention_edit.toyworld import model``: the one module object the node uses
(``toyworld.model`` would be a second copy, with a ToyConfig class of its own).

`toyworld.train` (the CLI; the stages are in `toyworld.training`) trains it and `toyworld.evaluate`
measures it. They need the ComfyUI host importable and the pack registered; importing them sets
nothing up (`toyworld.host.setup_host` does, and the CLIs call it).
"""
