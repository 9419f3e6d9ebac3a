"""A deployed node that runs only its own code: `fedpeft node` and the ClientApp runner it uses."""
