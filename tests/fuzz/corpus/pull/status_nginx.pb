

nginx