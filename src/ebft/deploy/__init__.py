"""What a run hands over: the merged model, the run card and the Hub upload."""
