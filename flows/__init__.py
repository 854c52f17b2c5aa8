"""The flows a leaf runs (`federated_round`, `federated_training`, `federated_evaluation`,
`federated_statistics`), the participant API they train, and their parts by concern: `leaf`,
`updates`, `publishing`, `federation`."""
