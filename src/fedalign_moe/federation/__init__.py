"""Flower layer: the ClientApp, the ServerApp and its round loop, the strategies."""
