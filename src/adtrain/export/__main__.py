from adtrain.export import main

main()
