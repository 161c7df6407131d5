"""What every layer of maxllama shares: parameter tree paths, the train-state type, process signals and exit
codes. It imports nothing else of the package."""
