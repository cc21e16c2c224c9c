"""The commands as functions, one run lifecycle each: train a teacher, pretrain, fine-tune, train an
interpreter, evaluate."""
