"""What a run takes in: the model folder's facts and the recipe's data made concrete."""
