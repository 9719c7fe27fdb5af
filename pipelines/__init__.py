"""memlab pipelines: data, training, tuning and the command-line tool."""
