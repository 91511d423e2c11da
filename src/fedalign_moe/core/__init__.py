"""The mathematics of FedAlign-MoE (arXiv 2603.21276) as pure functions over tensors.

No Flower or transformers import lives here. One module per component:
statistics (client routing statistics), gate_alignment (component 1), gate_regulariser
(component 2), semantic_alignment (component 3).
"""
