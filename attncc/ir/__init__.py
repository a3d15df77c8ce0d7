"""[2] The IR: typed nodes on a networkx DiGraph (graph), spec -> IR (build), checks, printing."""
