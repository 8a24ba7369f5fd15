
 
docker.io/library/busybox:1.36