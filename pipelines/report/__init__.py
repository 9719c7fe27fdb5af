"""`memlab report`: Zoology's recall-against-state-size comparison, run and written up."""
