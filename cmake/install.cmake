# Install the headers and an exported package config, so that
#   find_package(pyramidinfer CONFIG REQUIRED)
#   target_link_libraries(app PRIVATE pyramidinfer::pyramidinfer)
# works from an install prefix.
include(GNUInstallDirs)
include(CMakePackageConfigHelpers)

install(DIRECTORY include/pyramidinfer DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(TARGETS pyramidinfer EXPORT pyramidinferTargets)
install(EXPORT pyramidinferTargets
  NAMESPACE pyramidinfer::
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pyramidinfer)

configure_package_config_file(
  ${CMAKE_CURRENT_LIST_DIR}/pyramidinferConfig.cmake.in
  ${CMAKE_CURRENT_BINARY_DIR}/pyramidinferConfig.cmake
  INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pyramidinfer)
# Header-only: any architecture may use it.
write_basic_package_version_file(
  ${CMAKE_CURRENT_BINARY_DIR}/pyramidinferConfigVersion.cmake
  COMPATIBILITY SameMinorVersion ARCH_INDEPENDENT)
install(FILES
  ${CMAKE_CURRENT_BINARY_DIR}/pyramidinferConfig.cmake
  ${CMAKE_CURRENT_BINARY_DIR}/pyramidinferConfigVersion.cmake
  DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/pyramidinfer)
