// ClassifyAttempt with containerd's own words: the messages below are what containerd 1.6.20,
// 1.7.24 and 2.1.9 answered in the integration testbed (tests/integration, the containerd
// matrix), mirror host and repository shortened.
#include "pull/attempt_error.h"

#include <gtest/gtest.h>

#include <string>

namespace registry_proxy {
namespace {

using C = RpcCode;

AttemptClass Class(C code, const std::string& msg, bool own_deadline = false,
                   bool caller_gone = false) {
  return ClassifyAttempt(RpcStatus(code, msg), own_deadline, caller_gone).cls;
}
std::string Detail(C code, const std::string& msg) {
  return ClassifyAttempt(RpcStatus(code, msg), false, false).detail;
}

// containerd 1.6 and 1.7 word the resolve step alike; 2.x says "failed to resolve image".
const std::string k16 =
    "failed to pull and unpack image \"127.0.0.1:9/library/busybox:latest\": failed to resolve "
    "reference \"127.0.0.1:9/library/busybox:latest\": ";
const std::string k21 =
    "failed to pull and unpack image \"127.0.0.1:9/library/busybox:latest\": failed to resolve "
    "image: ";

TEST(AttemptErrorTest, RefusedResetAndTimeoutsAreDown) {
  const std::string refused =
      "failed to do request: Head \"http://127.0.0.1:9/v2/library/busybox/manifests/latest\": "
      "dial tcp 127.0.0.1:9: connect: connection refused";
  for (const std::string& pre : {k16, k21}) {
    EXPECT_EQ(Class(C::UNKNOWN, pre + refused), AttemptClass::kMirrorDown);
    EXPECT_EQ(Detail(C::UNKNOWN, pre + refused), "connection refused");
    EXPECT_EQ(Class(C::UNKNOWN, pre + "failed to do request: Head \"http://127.0.0.1:18501/v2/x\": "
                                      "read tcp 127.0.0.1:58682->127.0.0.1:18501: read: "
                                      "connection reset by peer"),
              AttemptClass::kMirrorDown);
    EXPECT_EQ(Class(C::UNKNOWN, pre + "failed to do request: Head \"http://m/v2/x\": EOF"),
              AttemptClass::kMirrorDown);
  }
  // Our own attempt deadline: the mirror was too slow.
  EXPECT_EQ(Class(C::DEADLINE_EXCEEDED, "Deadline Exceeded", true), AttemptClass::kMirrorDown);
  EXPECT_EQ(Detail(C::DEADLINE_EXCEEDED, "x"), "the caller's deadline");
}

// As the matrix run of failover_test (AttemptErrorsAreClassifiedAndNamedPerCandidate) logged
// them: a mirror resetting pulls, a mirror lacking the image, per containerd version.
TEST(AttemptErrorTest, EachVersionsWordsForResetAndNotFound) {
  const std::string img = "failed to pull and unpack image \"127.0.0.1:39029/rp/x:latest\": ";
  const std::string ref16 = "failed to resolve reference \"127.0.0.1:39029/rp/x:latest\": ";
  const std::string ref21 = "failed to resolve image: ";
  const std::string reset =
      "failed to do request: Head \"%s://127.0.0.1:39029/v2/rp/x/manifests/latest\": read tcp "
      "127.0.0.1:51610->127.0.0.1:39029: read: connection reset by peer";
  auto with_scheme = [&](const std::string& scheme) {
    std::string r = reset;
    return r.replace(r.find("%s"), 2, scheme);
  };
  // 1.6.20 (http), 1.7.24 (https first), 2.1.9 (https first, "failed to resolve image")
  for (const std::string& m :
       {img + ref16 + with_scheme("http"), img + ref16 + with_scheme("https"),
        img + ref21 + with_scheme("https")}) {
    EXPECT_EQ(Class(C::UNKNOWN, m), AttemptClass::kMirrorDown) << m;
    EXPECT_EQ(Detail(C::UNKNOWN, m), "connection reset") << m;
  }
  for (const std::string& pre : {img + ref16, img + ref21}) {
    const std::string m = pre + "127.0.0.1:39029/rp/x:latest: not found";
    EXPECT_EQ(Class(C::NOT_FOUND, m), AttemptClass::kNotFound) << m;
  }
}

TEST(AttemptErrorTest, TlsFailuresAreDown) {
  EXPECT_EQ(Class(C::UNKNOWN, k16 + "failed to do request: Head \"https://m/v2/x\": "
                                    "x509: certificate signed by unknown authority"),
            AttemptClass::kMirrorDown);
  EXPECT_EQ(Class(C::UNKNOWN, k21 + "failed to do request: Head \"https://m/v2/x\": "
                                    "tls: first record does not look like a TLS handshake"),
            AttemptClass::kMirrorDown);
  EXPECT_EQ(Class(C::UNKNOWN, k16 + "failed to do request: Head \"https://m/v2/x\": "
                                    "net/http: TLS handshake timeout"),
            AttemptClass::kMirrorDown);
}

TEST(AttemptErrorTest, ServerErrorsAreDownInEveryVersionsWording) {
  // 1.6 / 1.7
  const std::string v16 = k16 +
                          "pulling from host 127.0.0.1:18500 failed with status code "
                          "[manifests latest]: 500 Internal Server Error";
  EXPECT_EQ(Class(C::UNKNOWN, v16), AttemptClass::kMirrorDown);
  EXPECT_EQ(Detail(C::UNKNOWN, v16), "500 Internal Server Error");
  EXPECT_EQ(Class(C::UNKNOWN, k16 + "failed with status code [manifests latest]: 503 Service "
                                    "Unavailable"),
            AttemptClass::kMirrorDown);
  // 2.1 (after its own ~10 s of retries)
  const std::string v21 = k21 +
                          "unexpected status from HEAD request to http://127.0.0.1:54913/v2/"
                          "rp/x/manifests/latest: 500 Internal Server Error";
  EXPECT_EQ(Class(C::UNKNOWN, v21), AttemptClass::kMirrorDown);
  EXPECT_EQ(Detail(C::UNKNOWN, v21), "500 Internal Server Error");
  // 4xx: the registry is up and answered; not down, not "not found".
  EXPECT_EQ(Class(C::UNKNOWN, k16 + "pulling from host m.example failed with status code "
                                    "[manifests latest]: 401 Unauthorized"),
            AttemptClass::kOther);
  EXPECT_EQ(Class(C::UNKNOWN, k21 + "unexpected status from HEAD request to http://m/v2/x/"
                                    "manifests/latest: 403 Forbidden"),
            AttemptClass::kOther);
  // A 5 in a port or a digest is no status.
  EXPECT_EQ(Class(C::UNKNOWN, "failed to pull: 127.0.0.1:500 said no"), AttemptClass::kOther);
}

TEST(AttemptErrorTest, MissingImagesAreNotFound) {
  EXPECT_EQ(Class(C::NOT_FOUND, k16 + "127.0.0.1:47039/library/nothere:latest: not found"),
            AttemptClass::kNotFound);
  EXPECT_EQ(Class(C::UNKNOWN, k21 + "127.0.0.1:47039/library/nothere:latest: not found"),
            AttemptClass::kNotFound);
  EXPECT_EQ(DescribeAttempt({AttemptClass::kNotFound, "not found"}), "not found");
}

TEST(AttemptErrorTest, TheCallerGoingAwayBlamesNoOne) {
  EXPECT_EQ(Class(C::CANCELLED, "context canceled"), AttemptClass::kCallerGone);
  EXPECT_EQ(Class(C::DEADLINE_EXCEEDED, "Deadline Exceeded"), AttemptClass::kCallerGone);
  // Cancelled while the attempt failed for another reason: still the caller's doing.
  EXPECT_EQ(Class(C::UNKNOWN, k16 + "connect: connection refused", false, true),
            AttemptClass::kCallerGone);
}

TEST(AttemptErrorTest, ContainerdsOwnFailuresStopTheWalk) {
  EXPECT_EQ(Class(C::UNAVAILABLE,
                  "failed to connect to all addresses; last error: UNKNOWN: "
                  "unix:/run/containerd/containerd.sock: Connection refused"),
            AttemptClass::kContainerdFailed);
  // UNAVAILABLE is the channel to containerd, whatever the words.
  EXPECT_EQ(Class(C::UNAVAILABLE, "connect: connection refused"), AttemptClass::kContainerdFailed);
  // containerd 2.x has no CRI v1alpha2: its answer, whatever the candidate.
  EXPECT_EQ(Class(C::UNIMPLEMENTED, "unknown service runtime.v1alpha2.ImageService"),
            AttemptClass::kContainerdFailed);
  const std::string disk =
      "failed to pull and unpack image \"m/x:latest\": failed to extract layer sha256:abc: "
      "write /var/lib/containerd/x/busybox: no space left on device: unknown";
  EXPECT_EQ(Class(C::UNKNOWN, disk), AttemptClass::kContainerdFailed);
  EXPECT_EQ(Detail(C::UNKNOWN, disk), "no space left on device");
  // A full disk while downloading: containerd's, though the text says "copy".
  EXPECT_EQ(Class(C::UNKNOWN,
                  "failed to pull and unpack image \"m/x:latest\": failed to copy: "
                  "write /var/lib/containerd/ingest/x/data: no space left on device"),
            AttemptClass::kContainerdFailed);
  EXPECT_EQ(Class(C::UNKNOWN,
                  "failed to pull and unpack image \"m/x:latest\": failed to unpack "
                  "image on snapshotter overlayfs: failed to prepare extraction "
                  "snapshot \"extract-1\": x"),
            AttemptClass::kContainerdFailed);
}

TEST(AttemptErrorTest, OkAndNames) {
  EXPECT_EQ(ClassifyAttempt(RpcStatus::OK, true, false).cls, AttemptClass::kOk);
  EXPECT_EQ(DescribeAttempt({AttemptClass::kMirrorDown, "connection refused"}),
            "down (connection refused)");
  EXPECT_EQ(AttemptClassName(AttemptClass::kContainerdFailed), "containerd failed");
  EXPECT_EQ(AttemptClassName(AttemptClass::kCallerGone), "caller went away");
}

}  // namespace
}  // namespace registry_proxy
