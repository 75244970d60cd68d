# The Debian package, built by CPack from the install rules
# (cmake/KeyholdInstall.cmake and the front-ends' own):
#   cmake --build build/dev --target package     ->  build/dev/keyhold_<version>-1_<arch>.deb
# The layout is /usr (daemon in sbin, CLI in bin), whatever
# CMAKE_INSTALL_PREFIX says; the maintainer scripts beside this file create
# the keyhold user, its directories, and enable the socket. See README.md.
set(CPACK_GENERATOR DEB)
set(CPACK_SOURCE_GENERATOR TGZ)
set(CPACK_SOURCE_IGNORE_FILES "/\\.git/" "/build/")
set(CPACK_PACKAGE_NAME keyhold)
set(CPACK_PACKAGE_VENDOR keyhold)
set(CPACK_PACKAGE_CONTACT "keyhold developers <dev@keyhold.invalid>")
set(CPACK_PACKAGE_DESCRIPTION_SUMMARY
    "key-isolation daemon with an OpenSSL 3 provider and a PKCS#11 module")
set(CPACK_PACKAGE_DESCRIPTION
    "keyholdd keeps private keys out of application processes: applications
reach their keys through a Unix socket and never see a private key byte.
The daemon learns who is calling from the kernel and gives every uid its own
key namespace. This package holds keyholdd (a socket-activated systemd
service running as the keyhold user), the keyhold CLI, the OpenSSL 3
provider keyhold.so and the PKCS#11 module libkeyhold-pkcs11.so (registered
with p11-kit).")
set(CPACK_PACKAGING_INSTALL_PREFIX /usr)
set(CPACK_STRIP_FILES ON)
# Absolute destinations (/etc/keyhold, /lib/systemd/system, the OpenSSL and
# p11-kit directories) are intended.
set(CPACK_WARN_ON_ABSOLUTE_INSTALL_DESTINATION OFF)

set(CPACK_DEBIAN_FILE_NAME DEB-DEFAULT)
set(CPACK_DEBIAN_PACKAGE_RELEASE 1)
set(CPACK_DEBIAN_PACKAGE_SECTION admin)
set(CPACK_DEBIAN_PACKAGE_PRIORITY optional)
# Library dependencies come from dpkg-shlibdeps (dpkg-dev); adduser is for
# postinst/postrm. The TPM backend loads its TCTI by name at run time, which
# dpkg-shlibdeps cannot see.
set(CPACK_DEBIAN_PACKAGE_SHLIBDEPS ON)
set(CPACK_DEBIAN_PACKAGE_DEPENDS "adduser")
set(CPACK_DEBIAN_PACKAGE_RECOMMENDS "libtss2-tcti-device0, p11-kit")
set(CPACK_DEBIAN_PACKAGE_SUGGESTS "libtss2-tcti-swtpm0, softhsm2")

# Every file keyhold installs in /etc is a conffile: dpkg keeps an admin's
# edits on upgrade and removes them only on purge.
set(_kh_conffiles "")
foreach(_kh_file IN LISTS KH_ETC_FILES)
  string(APPEND _kh_conffiles "${_kh_file}\n")
endforeach()
file(WRITE ${CMAKE_BINARY_DIR}/packaging/conffiles "${_kh_conffiles}")
set(CPACK_DEBIAN_PACKAGE_CONTROL_EXTRA
    ${CMAKE_CURRENT_LIST_DIR}/postinst
    ${CMAKE_CURRENT_LIST_DIR}/prerm
    ${CMAKE_CURRENT_LIST_DIR}/postrm
    ${CMAKE_BINARY_DIR}/packaging/conffiles)
# Maintainer scripts 0755, conffiles 0644 whatever the checkout's modes.
set(CPACK_DEBIAN_PACKAGE_CONTROL_STRICT_PERMISSION ON)

include(CPack)
