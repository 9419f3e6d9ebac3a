"""The Flower ClientApp and what a client keeps between rounds."""
