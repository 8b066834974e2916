"""Toy world: synthetic scenes of simple coloured shapes with exact ground truth.

`toyworld.scenes` samples and renders scenes, captions and edit pairs; `toyworld.classifier` reads
the attributes back from an image. Both depend only on numpy and Pillow (the classifier also uses
scipy.ndimage for connected components), never on torch.
"""
